"""kit: recipes, a fast training engine, ensembles with TTA, submissions and reports for small-image competitions.

From Python (a notebook), the command line's verbs: kit.train, kit.predict, kit.evaluate, kit.report, kit.blend and
kit.lr_find (kit.api), loaded on first use so that `import kit` and the CLI stay quick."""

from kit.recipe import KIT_VERSION as __version__

VERBS = ("train", "predict", "evaluate", "report", "blend", "lr_find", "Run", "CV")


def __getattr__(name: str):
    if name in VERBS:
        from kit import api
        return getattr(api, name)
    raise AttributeError(f"module 'kit' has no attribute {name!r}")

__all__ = ["__version__", *VERBS]
