"""Every reader of a file from outside, fuzzed with hypothesis: generated pixel CSVs, CSVs of ids and labels, .npz
files, test pickles, sample submissions, probability files and recipes either read into a valid set or raise kit's
one-line error (KitError), never another exception. The example counts keep the whole module to seconds."""

import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kit.errors import KitError
from kit.recipe import DataSpec

EXAMPLES = int(os.environ.get("KIT_FUZZ_EXAMPLES", "60"))  # CI: 60 a reader; more to hunt by hand
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# CSV cells: mostly plausible, sometimes hostile (empty, signs, decimals, Unicode digits, huge numbers, quotes)
CELLS = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["", " ", "-1", "2.0", "2.5", "1e3", "²", "٣", "nan", "0x1f",
                                                                 "1" + "0" * 25, '"', "a,b", "cat", "007", "\u00e9"]),
                  st.text(max_size=4))


def _csv(rows: list[list[str]]) -> str:
    import csv
    import io
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def _reads_or_refuses(read, check=lambda result: None):
    """`read()` either returns a result that passes `check` or raises KitError with a one-line message."""
    try:
        result = read()
    except KitError as err:
        assert "\n" not in str(err) and str(err), repr(err)
        return None
    check(result)
    return result


def _valid_read(read) -> None:
    from kit.data.formats import label_indices
    n = len(read.images)
    assert n > 0 and str(read.images.dtype) == "torch.uint8" and len(read.ids) == n and len(read.where) == n
    if read.labels is not None:
        labels, classes = _reads_or_refuses(lambda: label_indices(read.labels, read.classes, read.path, read.where)) or (None, None)
        if labels is not None:
            assert len(labels) == n and labels.min() >= 0 and labels.max() < len(classes) and "" not in classes


@FUZZ
@given(header=st.lists(st.sampled_from(["label", "id", "p0", "p1", "p2", "p3", "x"]), min_size=1, max_size=6),
       rows=st.lists(st.lists(CELLS, min_size=0, max_size=7), max_size=5))
def test_pixel_csvs(header, rows):
    from kit.data.formats import read_pixels
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.csv"
        path.write_text(_csv([header, *rows]))
        spec = DataSpec(format="pixels", train="p.csv", image_size=2, channels=1)
        _reads_or_refuses(lambda: read_pixels(path, spec), _valid_read)
        _reads_or_refuses(lambda: read_pixels(path, spec, labelled=False), _valid_read)


@FUZZ
@given(rows=st.lists(st.tuples(st.sampled_from(["0", "1", "2", "01", "x", "", " 2"]), CELLS), max_size=5),
       header=st.sampled_from([["id", "label"], ["label", "id"], ["id"], ["image", "label"]]))
def test_csvs_of_ids_and_labels(rows, header):
    from PIL import Image

    from kit.data.formats import read_csv_and_images
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "train").mkdir()
        for i in range(3):
            Image.fromarray(np.full((4, 4, 3), i * 60, np.uint8)).save(root / "train" / f"{i}.png")
        (root / "labels.csv").write_text(_csv([header, *[list(r)[:len(header)] for r in rows]]))
        spec = DataSpec(format="csv", train="labels.csv", train_images="train", image_size=4)
        _reads_or_refuses(lambda: read_csv_and_images(root / "labels.csv", root / "train", spec), _valid_read)


ARRAYS = st.one_of(
    st.integers(0, 6).flatmap(lambda n: st.sampled_from([np.zeros((n, 4, 4, 3), np.uint8), np.zeros((n, 3, 4, 4), np.uint8),
                                                         np.zeros((n, 48), np.uint8), np.zeros((n, 4, 4, 3), np.float32),
                                                         np.zeros((n, 5, 4, 3), np.uint8)])),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6).map(np.array),
    st.lists(st.integers(-3, 2**40), max_size=6).map(np.array),
    st.lists(st.sampled_from(["cat", "dog", "", "1", "1.0"]), max_size=6).map(np.array),
    st.just(np.zeros((2, 2))), st.just(np.array(3)), st.just(np.array([True, False])), st.just(np.array([1 + 2j])))


@FUZZ
@given(arrays=st.dictionaries(st.sampled_from(["images", "labels", "ids", "classes", "train_images", "train_labels", "x"]),
                              ARRAYS, max_size=5))
def test_npz_files(arrays):
    from kit.data.formats import read_npz, unlabelled_ids
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.npz"
        np.savez(path, **arrays)
        spec = DataSpec(format="npz", train="a.npz", image_size=4)
        _reads_or_refuses(lambda: read_npz(path, spec, "train"), _valid_read)
        _reads_or_refuses(lambda: read_npz(path, spec, "test", labelled=False), _valid_read)
        _reads_or_refuses(lambda: unlabelled_ids(path))


PLAIN = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(), st.binary(max_size=8),
                               st.text(max_size=8), ARRAYS),
                     lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from([b"data", b"ids", "x"]),
                                                                                          inner, max_size=3)), max_leaves=8)


@FUZZ
@given(obj=st.one_of(PLAIN, st.fixed_dictionaries({b"data": ARRAYS, b"ids": ARRAYS})), raw=st.binary(max_size=40))
def test_test_pickles(obj, raw):
    from kit.data.datasets import read_test_ids, read_test_pickle
    with tempfile.TemporaryDirectory() as tmp:
        for content in (pickle.dumps(obj, protocol=2), raw):
            path = Path(tmp) / "test.pkl"
            path.write_bytes(content)
            test = _reads_or_refuses(lambda: read_test_pickle(path, 4, 3))
            assert test is None or (len(test.ids) == len(test.images) > 0 and test.images.shape[1:] == (3, 4, 4))
            _reads_or_refuses(lambda: read_test_ids(path))


@FUZZ
@given(header=st.lists(st.sampled_from(["id", "label", "cat", "dog", "0", "1", "Id"]), min_size=0, max_size=4, unique=True),
       rows=st.lists(st.lists(CELLS, min_size=0, max_size=4), max_size=4),
       classes=st.sampled_from([None, ["cat", "dog"], ["0", "1", "2"]]))
def test_sample_submissions(header, rows, classes):
    from kit.inference.submission import check_submission, format_from_template, submission_table
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample.csv"
        path.write_text(_csv([header, *rows]) if header else "")
        fmt = _reads_or_refuses(lambda: format_from_template(path, classes))
        if fmt is None or classes is None:
            return
        ids = np.array(fmt.order, dtype=object)
        probs = np.full((len(ids), len(classes)), 1 / len(classes))
        table = _reads_or_refuses(lambda: submission_table(fmt, ids, probs, classes, path))
        if table is not None:
            table.to_csv(Path(tmp) / "sub.csv", index=False)
            _reads_or_refuses(lambda: check_submission(Path(tmp) / "sub.csv", None, fmt, len(classes), classes))


@FUZZ
@given(arrays=st.dictionaries(st.sampled_from(["probs", "member_probs", "ids", "labels", "classes", "members"]),
                              st.one_of(ARRAYS, st.integers(1, 4).flatmap(
                                  lambda k: st.lists(st.floats(-1, 2), min_size=k, max_size=k).map(lambda r: np.array([r, r])))),
                              max_size=5),
       labelled=st.booleans())
def test_probability_files(arrays, labelled):
    from kit.inference.probs import read_probs

    def valid(f):
        probs = f.member_probs.numpy()
        assert probs.ndim == 3 and np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
        assert np.allclose(probs.sum(-1), 1, atol=1e-3) and len(f.ids) == probs.shape[1]
        if f.labels is not None:
            assert (f.labels >= 0).all() and (f.labels < probs.shape[2]).all()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.npz"
        np.savez(path, **arrays)
        _reads_or_refuses(lambda: read_probs(path, labelled), valid)


@FUZZ
@given(text=st.one_of(st.text(max_size=60), st.builds(lambda k, v: f"{k}: {v}\n", st.sampled_from(
    ["model", "data", "train", "optim", "model.num_classes", "name", "budget"]), st.sampled_from(
    ["{num_classes: -1}", "{epochs: .nan}", "[1, 2]", "{lr: 1e400}", "null", "{classes: [a, a]}", "{image_size: 0}", "&a [*a]"]))),
       raw=st.binary(max_size=20))
def test_recipes(text, raw):
    from kit.recipe import load_recipe
    with tempfile.TemporaryDirectory() as tmp:
        for content in (text.encode("utf-8", "surrogatepass"), raw):
            path = Path(tmp) / "r.yaml"
            path.write_bytes(content)
            _reads_or_refuses(lambda: load_recipe(path))


@pytest.mark.parametrize("name", ["pixels", "npz"])
def test_the_fuzzers_reach_valid_sets_too(name, tmp_path):
    """The strategies above include valid files: a reader that refused everything would pass them all."""
    from kit.data.formats import read_npz, read_pixels
    if name == "pixels":
        (tmp_path / "p.csv").write_text("label,p0,p1,p2,p3\n1,0,0,0,255\n")
        read = read_pixels(tmp_path / "p.csv", DataSpec(format="pixels", train="p.csv", image_size=2, channels=1))
    else:
        np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array(["cat", "dog"]))
        read = read_npz(tmp_path / "a.npz", DataSpec(format="npz", train="a.npz", image_size=4), "train")
    _valid_read(read)


# The readers issue 40 added or hardened: checkpoints (.pt fields, safetensors metadata), YAML with aliases, image
# files of every mode, and the API's arguments.

def _tiny_payload() -> dict:
    """A valid checkpoint payload of a tiny model (built once per test)."""
    from kit.cli import RECIPES_DIR
    from kit.models import build_model
    from kit.models.registry import count_parameters
    from kit.recipe import load_recipe, recipe_as_dict, with_num_classes
    recipe = with_num_classes(load_recipe(RECIPES_DIR / "demo.yaml", ("model.args.width=0.125",)), 10, "demo")
    model = build_model(recipe)
    return {"model": model.state_dict(), "ema": None, "recipe": recipe_as_dict(recipe), "classes": [str(i) for i in range(10)],
            "mean": [0.5] * 3, "std": [0.25] * 3, "num_params": count_parameters(model), "best_weights_from": "raw"}


FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(), st.text(max_size=6),
                         st.lists(st.one_of(st.text(max_size=3), st.integers(0, 3), st.floats()), max_size=11),
                         st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.floats()), max_size=3),
                         st.just({"w": torch.full((2,), float("nan"))}), st.just({"fc.bias": torch.zeros(3)}))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["model", "ema", "recipe", "classes", "mean", "std", "num_params",
                                                "best_weights_from", "weights_from"]),
                               st.one_of(st.just("<delete>"), FIELD_VALUES), max_size=3))
def test_checkpoints(changes):
    from kit.inference.checkpoint import load_checkpoint
    payload = _tiny_payload()
    for key, value in changes.items():
        payload.pop(key, None) if value == "<delete>" else payload.__setitem__(key, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pt"
        torch.save(payload, path)

        def valid(checkpoint):
            assert checkpoint.classes == [str(i) for i in range(10)] and len(set(checkpoint.classes)) == 10
            assert all(torch.isfinite(p).all() for p in checkpoint.model.state_dict().values() if p.is_floating_point())
        _reads_or_refuses(lambda: load_checkpoint(path, "better", torch.device("cpu")), valid)


@FUZZ
@given(meta=st.dictionaries(st.sampled_from(["format", "recipe", "classes", "mean", "std", "num_params", "weights_from", "x"]),
                            st.one_of(st.text(max_size=8), st.sampled_from(["kit-weights-1", "raw", "ema", "[0.5, 0.5, 0.5]",
                                                                            "null", "{", "[\"a\", \"a\"]", "12", "-1"])),
                            max_size=8))
def test_safetensors_metadata(meta):
    from safetensors.torch import save_file

    from kit.inference.checkpoint import load_checkpoint
    payload = _tiny_payload()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        save_file({k: v.contiguous() for k, v in payload["model"].items()}, str(path), metadata=meta)
        _reads_or_refuses(lambda: load_checkpoint(path, "better", torch.device("cpu")))


def _aliases(depth: int, width: int) -> str:
    lines = ["  a0: &a0 [x, y]"] + [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "model:\n  args:\n" + "\n".join("  " + line for line in lines) + "\n"


@FUZZ
@given(depth=st.integers(1, 9), width=st.integers(1, 12), tail=st.sampled_from(["", "optim: {lr: .nan}\n", "x: &r [*r]\n"]))
def test_recipes_with_aliases(depth, width, tail):
    from kit.recipe import load_recipe
    from kit.typed import YAML_MAX_NODES
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(_aliases(depth, width) + tail)
        _reads_or_refuses(lambda: load_recipe(path))
        if 2 * width ** (depth - 1) > YAML_MAX_NODES:
            with pytest.raises(KitError, match="aliases expand to over"):
                load_recipe(path)


IMAGE_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


@FUZZ
@given(mode=st.sampled_from(IMAGE_MODES), size=st.sampled_from([(4, 4), (4, 5), (1, 1)]), suffix=st.sampled_from([".png", ".tiff", ".bmp"]),
       raw=st.binary(max_size=30), seed=st.integers(0, 3), channels=st.sampled_from([1, 3]))
def test_image_files(mode, size, suffix, raw, seed, channels):
    from PIL import Image

    from kit.data.formats import decode_images
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"i{suffix}"
        image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, size[::-1] + (3,), dtype=np.uint8)).convert(mode)
        try:
            image.save(path)
        except (OSError, KeyError, ValueError):  # a mode this format cannot hold: the raw bytes below still test it
            path.write_bytes(raw)
        for content in (None, b"\x89PNG\r\n\x1a\n" + raw):
            if content is not None:
                path.write_bytes(content)
            images = _reads_or_refuses(lambda: decode_images([path], 4, channels))
            assert images is None or (images.dtype == torch.uint8 and tuple(images.shape) == (1, channels, 4, 4))


@FUZZ
@given(name=st.sampled_from(sorted(__import__("kit.recipe").recipe.ARGUMENTS)),
       value=st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.floats(), st.text(max_size=12),
                       st.sampled_from(["val", "test", "flip", "better", "cpu", "minimum", "index"])))
def test_api_arguments(name, value):
    from kit.recipe import ARGUMENTS, check_argument
    from kit.typed import in_range

    def valid(checked):
        arg = ARGUMENTS[name]
        assert checked is None or (checked in arg.choices if arg.choices else in_range(checked, arg.limits))
    _reads_or_refuses(lambda: check_argument(name, value), valid)
