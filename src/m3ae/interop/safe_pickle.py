"""Read pickles written by the authors' JAX code without executing anything stored in them.

A pickle is a program: every global it names is imported and every REDUCE calls it. The authors'
checkpoints are cloudpickle files that name flax, optax, ml_collections and cloudpickle globals
and carry code objects. `SafeUnpickler` therefore resolves globals itself:

- a short allow-list of numpy array/dtype/scalar builders is replaced by our own checked versions
  (no object dtypes, so no nested unpickling inside numpy);
- every other global (flax, optax, jax, builtins.eval, os.system, subprocess.Popen, copyreg
  helpers, cloudpickle code builders, ...) becomes an `Opaque` class: calling it, instantiating
  it, setting its state or items only records the arguments. Nothing is imported, nothing runs.

Persistent ids and out-of-band buffers also become `Opaque` records / errors. The result is plain
containers, numpy arrays and `Opaque` records, which `field` / `find_opaque` navigate.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO, Iterator

import numpy as np

# Guard against absurd allocations from a corrupt or hostile header (shape/dtype claim).
_MAX_ARRAY_BYTES = 1 << 36


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something the safe reader will not do."""


class Opaque:
    """Inert stand-in for any object the pickle wanted to build from a non-allowed global.

    The class itself stands for the global (`Opaque.module`, `Opaque.qualname`); instances record
    the arguments of the call or `__new__`, then any state, items and appended elements.
    """

    module = ""
    qualname = ""
    _record: dict[str, Any]  # set in __new__ (instances refuse __setattr__)

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        self = object.__new__(cls)
        object.__setattr__(self, "_record", {"args": args, "kwargs": kwargs, "state": None,
                                             "items": {}, "list": [], "calls": []})
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # arguments already recorded
        pass

    # The pickle machinery's hooks: record, never act.
    def __setstate__(self, state: Any) -> None:
        self._record["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        try:
            self._record["items"][key] = value
        except TypeError:  # unhashable key: keep it anyway, in order
            self._record["list"].append((key, value))

    def append(self, value: Any) -> None:
        self._record["list"].append(value)

    def extend(self, values: Any) -> None:
        self._record["list"].extend(values)

    def add(self, value: Any) -> None:
        self._record["list"].append(value)

    def __call__(self, *args: Any, **kwargs: Any) -> "Opaque":
        # An opaque object used as a callable (e.g. a rebuilt type) yields another record.
        result = _opaque_class(self.module, f"{self.qualname}()")(*args, **kwargs)
        self._record["calls"].append(result)
        return result

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"refusing to set attribute {name!r} on opaque {self.name}")

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}" if self.module else self.qualname

    @property
    def args(self) -> tuple:
        return self._record["args"]

    @property
    def kwargs(self) -> dict:
        return self._record["kwargs"]

    @property
    def state(self) -> Any:
        return self._record["state"]

    @property
    def items(self) -> dict:
        return self._record["items"]

    def attributes(self) -> dict:
        """Best guess at the object's fields: its state dict (plain or (dict, slots)), kwargs, items."""
        out: dict = {}
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and all(
                s is None or isinstance(s, dict) for s in state):
            for part in state:
                out.update(part or {})
        elif isinstance(state, dict):
            out.update(state)
        out.update(self.kwargs)
        out.update(self.items)
        return out

    def __repr__(self) -> str:
        return f"<opaque {self.name}>"


_OPAQUE_CLASSES: dict[tuple[str, str], type] = {}


def _opaque_class(module: str, qualname: str) -> type:
    key = (module, qualname)
    if key not in _OPAQUE_CLASSES:
        _OPAQUE_CLASSES[key] = type(f"Opaque[{module}.{qualname}]", (Opaque,),
                                    {"module": module, "qualname": qualname})
    return _OPAQUE_CLASSES[key]


# -- numpy builders (ours: checked, never unpickle nested data) ---------------------------------
def _checked_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError(f"array dtype is not a numpy dtype: {dtype!r}")
    # Plain numeric dtypes only: object or structured dtypes could smuggle nested objects.
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None \
            or dtype.hasobject:
        raise UnsafePickleError(f"array dtype {dtype} is refused (plain numeric dtypes only)")
    return dtype


def _checked_shape(shape: Any, dtype: np.dtype) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise UnsafePickleError(f"bad array shape {shape!r}")
    if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > _MAX_ARRAY_BYTES:
        raise UnsafePickleError(f"array of shape {shape} is implausibly large")
    return shape


class SafeArray(np.ndarray):
    """ndarray whose pickle state is checked before numpy sees it (no object dtypes)."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("unexpected ndarray state")
        dtype = _checked_dtype(state[-3])
        _checked_shape(tuple(state[-4]), dtype)
        if not isinstance(state[-1], (bytes, bytearray)):
            raise UnsafePickleError("ndarray data must be raw bytes")
        np.ndarray.__setstate__(self, state)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> SafeArray:
    # numpy's pickle: _reconstruct(ndarray, (0,), b'b') then BUILD with the real state.
    if isinstance(dtype, (bytes, str)):
        dtype = np.dtype(dtype if isinstance(dtype, str) else dtype.decode("latin1"))
    dtype = _checked_dtype(dtype)
    return np.ndarray.__new__(SafeArray, _checked_shape(shape, dtype), dtype)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    # numpy's protocol-5 pickle of a contiguous array.
    dtype = _checked_dtype(dtype)
    shape = _checked_shape(shape, dtype)
    if isinstance(buffer, pickle.PickleBuffer):
        buffer = buffer.raw()
    if not isinstance(buffer, (bytes, bytearray, memoryview)):
        raise UnsafePickleError("array buffer must be bytes")
    if order not in ("C", "F"):
        raise UnsafePickleError(f"bad array order {order!r}")
    array = np.frombuffer(buffer, dtype=dtype)
    return array.reshape(shape, order="F" if order == "F" else "C").copy(order="K")


def _scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _checked_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError("numpy scalar data must be bytes of the dtype's size")
    return np.frombuffer(data, dtype=dtype)[0]


def _dtype(obj: Any, align: Any = False, copy: Any = True) -> np.dtype:
    # Only simple type codes ('f4', 'V8', 'O8'): numpy builds the rest from BUILD state.
    if isinstance(obj, bytes):  # Python 2 pickles read with encoding="bytes" (e.g. CIFAR batches)
        obj = obj.decode("latin1")
    if not isinstance(obj, str) or len(obj) > 16:
        raise UnsafePickleError(f"refusing numpy.dtype({obj!r})")
    # Always a fresh copy: BUILD then sets its state, which must never touch numpy's singletons.
    return np.dtype(obj, align=bool(align), copy=True)


def _jax_reconstruct_array(fun: Any, args: Any, arr_state: Any, aval_state: Any) -> np.ndarray:
    # jax.Array pickles as (numpy reduce triple, aval): rebuild the numpy part with our builders.
    if fun is not _reconstruct:
        raise UnsafePickleError("jax array with an unexpected builder")
    array = _reconstruct(*args)
    array.__setstate__(arr_state)
    return array


def _refuse(what: str) -> Any:
    raise UnsafePickleError(f"refusing {what}")


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); allow only that codec
    # (other codecs would import modules).
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafePickleError(f"refusing _codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric", "numpy")
_ALLOWED: dict[tuple[str, str], Any] = {}
for _module in _NUMPY_MODULES:
    _ALLOWED[(_module, "_reconstruct")] = _reconstruct
    _ALLOWED[(_module, "_frombuffer")] = _frombuffer
    _ALLOWED[(_module, "scalar")] = _scalar
_ALLOWED[("numpy", "dtype")] = _dtype
_ALLOWED[("jax._src.array", "_reconstruct_array")] = _jax_reconstruct_array
_ALLOWED[("_codecs", "encode")] = _latin1_encode
# Protocol 2 writes empty bytes as bytes() (module '__builtin__' under fix_imports).
for _module in ("builtins", "__builtin__"):
    _ALLOWED[(_module, "bytes")] = lambda *args: b"" if not args else _refuse("bytes(...)")
# Plain containers (harmless constructors).
_ALLOWED[("collections", "OrderedDict")] = dict
_ALLOWED[("builtins", "set")] = set
_ALLOWED[("builtins", "frozenset")] = frozenset
_ALLOWED[("builtins", "complex")] = complex


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals are either our checked builders or inert `Opaque` classes."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle hook
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        return _opaque_class(str(module), str(name))

    def persistent_load(self, pid: Any) -> Any:
        return _opaque_class("<persistent>", "pid")(pid)


def safe_load(source: str | os.PathLike | bytes | BinaryIO, encoding: str = "ASCII") -> Any:
    """Unpickle `source` (a path, bytes or binary file) with `SafeUnpickler`. Never runs its code.
    `encoding` as in pickle: "bytes" keeps Python 2 strings as bytes."""
    if isinstance(source, (bytes, bytearray)):
        return SafeUnpickler(io.BytesIO(source), encoding=encoding).load()
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return SafeUnpickler(f, encoding=encoding).load()
    return SafeUnpickler(source, encoding=encoding).load()


# -- navigation --------------------------------------------------------------------------------
def field(obj: Any, name: str) -> Any:
    """obj[name] for mappings, the recorded field for opaque objects; KeyError if absent."""
    obj = unwrap(obj)
    if isinstance(obj, dict):
        return obj[name]
    if isinstance(obj, Opaque):
        return obj.attributes()[name]
    raise KeyError(name)


def unwrap(obj: Any) -> Any:
    """See through wrappers that only hold one mapping (e.g. flax FrozenDict(dict))."""
    while isinstance(obj, Opaque) and not obj.attributes() and len(obj.args) == 1 \
            and isinstance(obj.args[0], (dict, Opaque)):
        obj = obj.args[0]
    return obj


def find_opaque(obj: Any, suffix: str | None, _seen: set | None = None) -> Iterator[Opaque]:
    """Every opaque object under `obj` whose global name ends with `suffix` (any, for None; depth first)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Opaque):
        if suffix is None or obj.qualname == suffix or obj.qualname.endswith("." + suffix):
            yield obj
        children = [obj.args, obj.kwargs, obj.state, obj.items, obj._record["list"]]
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        return
    for child in children:
        yield from find_opaque(child, suffix, seen)
