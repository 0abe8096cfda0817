"""The house: kit's folders are its architecture, and every import (at the top of a module or inside a function)
points down the rooms, never up and never in a circle:

    kit (the package), kit.api, cli  ->  sweep  ->  training  ->  inference  ->  models  ->  data  ->  core (recipe, device, io, errors)"""

import ast
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parent.parent / "kit"
ROOMS = [  # lowest first: a module may import its own room and the rooms before it
    ("core", ("kit.errors", "kit.io", "kit.typed", "kit.faults", "kit.recipe", "kit.device")),
    ("data", ("kit.data",)),
    ("models", ("kit.models",)),
    ("inference", ("kit.inference",)),
    ("training", ("kit.training",)),
    ("sweep", ("kit.sweep",)),
    ("commands", ("kit", "kit.api", "kit.cli")),  # the package's verbs (kit.api, loaded by `import kit` on first use)
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in KIT.rglob("*.py"):
        name = ".".join(path.relative_to(KIT.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every kit module `path` imports, wherever the import stands."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kit":
            out |= {t for t in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if t in modules}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
    return out


def _room(module: str) -> int:
    rooms = [i for i, (_, prefixes) in enumerate(ROOMS) for p in prefixes if module == p or (p != "kit" and module.startswith(p + "."))]
    assert rooms, f"{module} is in no room: add it to tests/test_layout.py's ROOMS (and the README's layout)"
    return max(rooms)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_every_arrow_points_down_the_rooms():
    up = [f"{m} ({ROOMS[_room(m)][0]}) imports {t} ({ROOMS[_room(t)][0]})"
          for m, targets in _graph().items() for t in targets if _room(t) > _room(m)]
    assert not up, "\n".join(up)


def test_no_import_circles():
    graph = _graph()
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in path:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, "\n".join(sorted(set(circles)))


@pytest.mark.parametrize("room", ["data", "training", "inference", "cli"])
def test_each_room_is_a_folder(room):
    assert (KIT / room / "__init__.py").is_file()
    assert len(list(KIT.glob("*.py"))) <= 8  # the rest of kit/ is the core and the commands, not 40 modules side by side


def test_kit_train_reaches_the_update_in_four_calls(monkeypatch, demo_data, tmp_path, run):
    """The click command calls train, train calls Run.fit, which hands itself as hooks to the one epoch loop
    (Trainer.fit), which calls Trainer.update."""
    import inspect

    from kit.cli import RECIPES_DIR
    from kit.training.engine import Trainer
    callers = []
    update = Trainer.update

    def watched(self):
        if not callers:
            names = [frame.function for frame in inspect.stack()[1:]]  # innermost first
            callers.extend(reversed(names[:names.index("train_cmd") + 1]))
        update(self)

    monkeypatch.setattr(Trainer, "update", watched)
    code, out = run("train", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, "--runs", tmp_path, "--device", "cpu",
                    "--set", "train.epochs=1", "--set", "model.args.width=0.125")
    assert code == 0, out
    assert callers == ["train_cmd", "train", "fit", "fit"]
