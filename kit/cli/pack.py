"""`kit pack`: a folder ready to upload as Kaggle datasets for a code competition, where the notebook runs with the
internet off. Teams upload a wheelhouse and their checkpoints as datasets and install with `pip install --no-index
--find-links` (a wheel without its dependencies fails: OpenTabular/DeepTab #200):

    OUT/
      kit-wheels/        kit's wheel and the wheels of its dependencies the target image lacks (pip download for the
                         given Python version and platform; torch and torchvision left to the image by default),
                         with dataset-metadata.json
      kit-checkpoints/   the chosen checkpoints as safetensors (weights + recipe, no optimizer state), a CV directory as
                         its k fold models, with dataset-metadata.json
      inference.py       installs kit from kit-wheels with --no-index and writes the submission: no network
      inference.ipynb    the same, as the competition's notebook

The image's packages are named by `image_has` (what `pip list` shows in the competition's image; default: the torch
family, which Kaggle's and Colab's images ship built for their GPUs)."""

import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

from kit.errors import KitError

IMAGE_HAS = ("torch", "torchvision", "triton", "nvidia-*")  # left to the image: its CUDA build
WHEELS, CHECKPOINTS = "kit-wheels", "kit-checkpoints"
INPUT_DIRS = ("/kaggle/input",)  # where Kaggle mounts the datasets; else the folder beside inference.py


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def lacking(image_has: tuple[str, ...] = IMAGE_HAS, root: str = "kit") -> dict[str, str]:
    """{distribution: installed version} of kit's dependency closure (as installed here, the versions kit is tested
    with) that the image does not have (`image_has`: names, `prefix-*` patterns); kit itself excluded."""
    def has(name: str) -> bool:
        return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in image_has)

    wanted, queue = {}, [root]
    while queue:
        name = queue.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            dep = _name(requirement)
            if dep not in wanted and not has(dep) and dep != root:
                try:
                    wanted[dep] = metadata.version(dep)
                except metadata.PackageNotFoundError:
                    continue
                queue.append(dep)
    return dict(sorted(wanted.items()))


def download_command(packages: dict[str, str], wheels: Path, python: str, platform: str) -> list[str]:
    """pip download of exactly these versions' wheels for the target Python and platform, without their dependencies
    (the closure is already listed)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(wheels),
            "--python-version", python, "--platform", platform, "--implementation", "cp",
            *[f"{name}=={version}" for name, version in packages.items()]]


def kit_wheel(wheels: Path) -> Path:
    """kit's own wheel, built from its source (an editable install's checkout), offline."""
    import kit
    source = Path(kit.__file__).resolve().parents[1]
    if not (source / "pyproject.toml").is_file():
        raise KitError(f"{source}: kit pack builds kit's wheel from its source: install kit from a checkout (pip install -e .)")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
                             str(wheels), str(source)], capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise KitError(f"{source}: kit's wheel could not be built ({tail})")
    return next(wheels.glob("kit-*.whl"))


def metadata_file(folder: Path, user: str, slug: str, title: str) -> None:
    (folder / "dataset-metadata.json").write_text(json.dumps({"title": title, "id": f"{user}/{slug}",
                                                              "licenses": [{"name": "CC0-1.0"}]}, indent=2) + "\n")


def pack(checkpoints: list[str], out: str | Path, test: str, python: str = f"{sys.version_info.major}.{sys.version_info.minor}",
         platform: str = "manylinux2014_x86_64", image_has: tuple[str, ...] = IMAGE_HAS, user: str = "your-kaggle-username",
         tta: str | None = None, echo: Callable[[str], None] = print) -> Path:
    """Write the folder (see the module's docstring); `test` is the test set's path as the competition's notebook sees
    it (e.g. /kaggle/input/<competition>/test.pkl). Returns the folder."""
    from kit.inference.ensemble import expand_paths
    from kit.inference.export import export_one
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise KitError(f"{out}: exists and is not empty: kit pack writes a new folder")
    paths = expand_paths(checkpoints)
    wheels, ckpts = out / WHEELS, out / CHECKPOINTS
    wheels.mkdir(parents=True)
    ckpts.mkdir()
    names = []
    for i, path in enumerate(paths):
        name = f"model-{i}.safetensors"
        export_one(path, "safetensors", "better", str(ckpts / name), echo=lambda _: None)
        names.append(name)
    wheel = kit_wheel(wheels)
    needed = lacking(image_has)
    if needed:
        result = subprocess.run(download_command(needed, wheels, python, platform), capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            shutil.rmtree(out)
            raise KitError(f"pip download of {len(needed)} wheels for Python {python} on {platform} failed ({tail}); "
                           f"name what the image has with --image-has")
    metadata_file(wheels, user, WHEELS, "kit wheels")
    metadata_file(ckpts, user, CHECKPOINTS, "kit checkpoints")
    script = inference_script(names, test, tta)
    (out / "inference.py").write_text(script)
    write_notebook(out / "inference.ipynb", script)
    echo(f"pack: {out}: {wheel.name} and {len(needed)} dependencies for Python {python} on {platform} in {WHEELS}/ "
         f"(left to the image: {', '.join(image_has)}), {len(names)} checkpoints in {CHECKPOINTS}/, inference.py, "
         f"inference.ipynb")
    echo(f"upload: kaggle datasets create -p {wheels}; kaggle datasets create -p {ckpts}; then attach both to the "
         f"competition's notebook (internet off) and run inference.ipynb")
    return out


def inference_script(names: list[str], test: str, tta: str | None) -> str:
    return f'''"""Offline inference (written by kit pack): install kit from the {WHEELS} dataset with --no-index, then write
the submission with the {CHECKPOINTS} dataset's models. No network is used."""
import argparse
import subprocess
import sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--input", help="the folder holding {WHEELS}/ and {CHECKPOINTS}/ (default: /kaggle/input, "
                                    "else beside this file)")
parser.add_argument("--test", default={test!r}, help="the competition's test set")
parser.add_argument("--out", default="submission.csv")
args, _ = parser.parse_known_args()
here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
found = [Path(d) for d in {list(INPUT_DIRS)!r} if (Path(d) / {WHEELS!r}).is_dir()]
root = Path(args.input) if args.input else (found[0] if found else here)
subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(root / {WHEELS!r}), "kit"],
               check=True)
models = [str(root / {CHECKPOINTS!r} / name) for name in {names!r}]
subprocess.run([sys.executable, "-m", "kit.cli", "predict", *models, "--test", args.test, "--out", args.out,
                {"*[]" if tta is None else f'"--tta", {tta!r}'}], check=True)
print("submission:", args.out)
'''


def write_notebook(path: Path, script: str) -> None:
    """The script as a one-cell notebook (nbformat 4, written as JSON: no nbformat needed here)."""
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": script.splitlines(True)}
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook = {"cells": [cell], "metadata": {"kernelspec": kernel}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(notebook, indent=1) + "\n")
