"""Pickles from outside, read without running their code.

A pickle names the functions that rebuild its objects, and `pickle.load` calls whatever it names: a CIFAR batch
or a competition's test pickle handed round in a class or a forum could run any command. The CIFAR-10/100 python
batches and the competition's test pickle hold only dicts, lists, text, bytes, numbers and numpy arrays, so the
unpickler here rebuilds those and refuses every other name, in one line naming the file and what it refused."""

import codecs
import pickle
from pathlib import Path

from kit.errors import KitError

NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
NUMPY_NAMES = {"ndarray", "dtype", "_reconstruct", "scalar", "_frombuffer"}  # arrays, dtypes, numpy scalars
BUILTINS = {"set", "frozenset", "bytearray", "complex"}
WHAT_IS_READ = "dicts, lists, text, bytes, numbers and numpy arrays"


class Refused(pickle.UnpicklingError):
    """A pickle named something other than plain data."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 2 stores bytes as `_codecs.encode(text, 'latin1')`; no other codec is looked up."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise Refused(f"_codecs.encode with the codec {encoding!r}")
    return text.encode("latin1")


class DataUnpickler(pickle.Unpickler):
    """Rebuilds only plain data and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str):
        if module in NUMPY_MODULES and name in NUMPY_NAMES:
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name in BUILTINS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        raise Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise Refused(f"a persistent id ({type(pid).__name__})")


def load(path: Path):
    """The pickle at `path`, rebuilt by DataUnpickler (bytes kept as bytes, as CIFAR's Python 2 batches need).
    A refused name is one KitError; other failures propagate for the caller to describe."""
    with open(path, "rb") as f:
        try:
            return DataUnpickler(f, encoding="bytes").load()
        except Refused as refused:
            raise KitError(f"{path}: refused to unpickle {refused.name}: a pickle may run code, so kit reads only "
                           f"{WHAT_IS_READ} from one") from None
