"""kit: recipes, a fast training engine, ensembles with TTA, submissions and reports for small-image competitions.

From Python (a notebook), the command line's verbs: kit.train, kit.predict, kit.evaluate, kit.interpret, kit.report,
kit.blend, kit.lr_find and kit.runs (kit.api, each with its arguments and return type in help()), loaded on first use
so that `import kit` and the CLI stay quick."""

from kit.recipe import KIT_VERSION as __version__

VERBS = ("train", "predict", "evaluate", "interpret", "report", "blend", "lr_find", "runs", "Run", "CV")


def __getattr__(name: str):
    if name in VERBS:
        from kit import api
        return getattr(api, name)
    raise AttributeError(f"module 'kit' has no attribute {name!r}")

def __dir__() -> list[str]:
    return sorted([*globals(), *VERBS])


__all__ = ["__version__", *VERBS]
