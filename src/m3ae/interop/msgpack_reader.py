"""Decode Flax msgpack files (`flax.serialization.msgpack_serialize`) without the msgpack package.

Only data is decoded: msgpack has no code, so this is safe by construction. Covers the msgpack
subset Flax writes (maps, arrays, str/bin, ints, floats, bool, nil, ext) and Flax's ext types:
1 = ndarray, 2 = complex, 3 = numpy scalar, each as msgpack (shape, dtype name, bytes); plus
Flax's chunked-array dicts for arrays over 1 GiB.
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np


class MsgpackError(ValueError):
    """The bytes are not msgpack of the kind Flax writes."""


# Flax trees nest about ten deep. Each level takes three Python frames (value, map/array and its
# comprehension): 512 overflowed the interpreter's stack (a RecursionError) before this check fired.
_MAX_DEPTH = 128


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MsgpackError("truncated msgpack data")
        out = self.data[self.pos: self.pos + n].tobytes()
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise MsgpackError("msgpack nesting too deep")
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self.take(b & 0x1F).decode("utf-8")
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        sized = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}  # bin 8/16/32
        if b in sized:
            return self.take(self.unpack(sized[b]))
        ext_sized = {0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}  # ext 8/16/32
        if b in ext_sized:
            n = self.unpack(ext_sized[b])
            code = self.unpack(">b")
            return _ext(code, self.take(n))
        numbers = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
                   0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
        if b in numbers:
            return self.unpack(numbers[b])
        fixext = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
        if b in fixext:
            code = self.unpack(">b")
            return _ext(code, self.take(fixext[b]))
        strs = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
        if b in strs:
            return self.take(self.unpack(strs[b])).decode("utf-8")
        if b in (0xDC, 0xDD):
            return self.array(self.unpack(">H" if b == 0xDC else ">I"), depth)
        if b in (0xDE, 0xDF):
            return self.map(self.unpack(">H" if b == 0xDE else ">I"), depth)
        raise MsgpackError(f"unsupported msgpack type byte 0x{b:02x}")

    def array(self, n: int, depth: int) -> list:
        return [self.value(depth + 1) for _ in range(n)]

    def map(self, n: int, depth: int) -> dict:
        out = {}
        for _ in range(n):
            key = self.value(depth + 1)
            if isinstance(key, list):
                key = tuple(key)
            out[key] = self.value(depth + 1)
        return out


def _bfloat16_to_float32(raw: bytes) -> np.ndarray:
    # numpy has no bfloat16: it is the top half of a float32.
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32)


def _ndarray(payload: bytes) -> np.ndarray:
    decoded = unpackb(payload)
    if not (isinstance(decoded, list) and len(decoded) == 3):
        raise MsgpackError("bad Flax ndarray payload")
    shape, dtype_name, buffer = decoded
    if isinstance(dtype_name, bytes):
        dtype_name = dtype_name.decode("ascii")
    if not isinstance(buffer, bytes) or not isinstance(shape, list):
        raise MsgpackError("bad Flax ndarray payload")
    if dtype_name == "bfloat16":
        flat = _bfloat16_to_float32(buffer)
    else:
        dtype = np.dtype(dtype_name)
        if dtype.kind not in "biufc":
            raise MsgpackError(f"unsupported array dtype {dtype_name!r}")
        flat = np.frombuffer(buffer, dtype=dtype)
    return flat.reshape(tuple(shape)).copy()


def _ext(code: int, payload: bytes) -> Any:
    if code == 1:
        return _ndarray(payload)
    if code == 3:
        return _ndarray(payload)[()]
    if code == 2:
        real, imag = unpackb(payload)
        return complex(real, imag)
    raise MsgpackError(f"unknown msgpack ext type {code}")


def _unchunk(tree: Any) -> Any:
    """Flax splits arrays over 1 GiB into {'__msgpack_chunked_array__', 'shape', 'chunks'}."""
    if not isinstance(tree, dict):
        return tree
    if "__msgpack_chunked_array__" in tree:
        shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate([np.ravel(c) for c in chunks]).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}


def unpackb(data: bytes) -> Any:
    """One msgpack value from `data` (all of it)."""
    reader = _Reader(data)
    value = reader.value()
    if reader.pos != len(reader.data):
        raise MsgpackError("trailing bytes after msgpack value")
    return value


def load_flax_msgpack(data: bytes) -> Any:
    """A Flax msgpack state (nested dicts of arrays), chunked arrays reassembled."""
    return _unchunk(unpackb(data))
