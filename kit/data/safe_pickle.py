"""Pickles from outside, read without running their code.

A pickle names the functions that rebuild its objects, and `pickle.load` calls whatever it names: a CIFAR batch
or a competition's test pickle handed round in a class or a forum could run any command. The CIFAR-10/100 python
batches and the competition's test pickle hold only dicts, lists, text, bytes, numbers and numpy arrays, so the
unpickler here rebuilds those and refuses every other name, in one line naming the file and what it refused.

Memory is bounded too: a few bytes of pickle can ask numpy or bytearray for gigabytes (`ndarray((10**9,))`, an
array whose state declares a shape its data does not hold, which numpy answers with a crash for object arrays). So
the file is read whole first (no read of a length it merely declares), the unpickler is pickle's own Python one
with the array state checked before numpy sees it, and nothing it builds may hold more bytes than the file itself
(MAX_GROWTH times, for object arrays' pointers)."""

import codecs
import io
import math
import pickle
from pathlib import Path

import numpy as np

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


MAX_GROWTH = 8  # an object array's pointers: 8 bytes an element, each element at least one byte of pickle


class TooLarge(pickle.UnpicklingError):
    """A pickle asked for more memory than its own size can describe."""


class _NdarrayName:
    """What the name numpy.ndarray unpickles to: `_reconstruct` receives it as the class to build (an empty array,
    its contents come from the checked state); called directly (`ndarray(shape)`) it would allocate: refused."""

    def __call__(self, *args, **kwargs):
        raise TooLarge(f"numpy.ndarray{args}, an allocation of any size")


NDARRAY = _NdarrayName()


class DataUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD can be checked (the C one's cannot)
    """Rebuilds only plain data and numpy arrays, within the memory its file's size allows; any other global is
    refused."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.limit = MAX_GROWTH * len(data) + 4096

    def find_class(self, module: str, name: str):
        if module in NUMPY_MODULES and name in NUMPY_NAMES:
            real = super().find_class(module, name)
            checked = {"ndarray": lambda: NDARRAY, "_reconstruct": lambda: self._reconstruct(real),
                       "scalar": lambda: self._scalar(real), "_frombuffer": lambda: self._frombuffer(real)}
            return checked[name]() if name in checked else real
        if module in ("builtins", "__builtin__") and name in BUILTINS:
            return self._bytearray if name == "bytearray" else super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        raise Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise Refused(f"a persistent id ({type(pid).__name__})")

    def _fits(self, count, dtype) -> np.dtype:
        """`dtype` as a plain numpy dtype, `count` elements of which fit in the limit."""
        dtype = np.dtype(dtype)
        if dtype.fields is not None or dtype.subdtype is not None:
            raise Refused(f"an array of the structured dtype {dtype}")
        if count * dtype.itemsize > self.limit:
            raise TooLarge(f"{count:,} elements of {dtype}")
        return dtype

    def _reconstruct(self, real):
        def reconstruct(cls, shape, dtype):
            if cls is not NDARRAY:
                raise Refused(f"numpy._reconstruct of {type(cls).__name__}")
            return real(np.ndarray, shape, self._fits(_count(shape), dtype))
        return reconstruct

    def _scalar(self, real):
        return lambda dtype, *args: real(self._fits(1, dtype), *args)

    def _frombuffer(self, real):
        def frombuffer(buffer, dtype, shape, order):
            self._fits(_count(shape), dtype)
            return real(buffer, dtype, shape, order)
        return frombuffer

    def _bytearray(self, *args):
        if args and isinstance(args[0], int):
            raise TooLarge(f"bytearray({args[0]:,}), an allocation of any size")
        return bytearray(*args)

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.ndarray):
            _check_array_state(self, state)
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _count(shape) -> int:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise Refused(f"an array of shape {shape!r}")
    return math.prod(shape)


def _check_array_state(unpickler: DataUnpickler, state) -> None:
    """numpy's array state (version, shape, dtype, fortran, data): the data must be exactly what the shape declares."""
    if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)):
        raise Refused("an array state that is not numpy's")
    _, shape, dtype, _, data = state
    count = _count(shape)
    dtype = unpickler._fits(count, dtype)
    if dtype.hasobject:
        ok = isinstance(data, list) and len(data) == count
    else:
        ok = isinstance(data, (bytes, bytearray)) and len(data) == count * dtype.itemsize
    if not ok:
        raise Refused(f"an array whose data ({type(data).__name__}) is not the {count:,} elements of {dtype} its shape declares")


def load(path: Path):
    """The pickle at `path`, rebuilt by DataUnpickler (bytes kept as bytes, as CIFAR's Python 2 batches need).
    A refused name is one KitError; other failures propagate for the caller to describe."""
    data = path.read_bytes()
    try:
        return DataUnpickler(data).load()
    except Refused as refused:
        raise KitError(f"{path}: refused to unpickle {refused.name}: a pickle may run code, so kit reads only "
                       f"{WHAT_IS_READ} from one") from None
    except TooLarge as large:
        raise KitError(f"{path}: refused: it asks for {large} (more memory than its {len(data):,} bytes can "
                       f"describe)") from None
