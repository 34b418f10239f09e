"""Safe import of the authors' checkpoints: every array recovered, nothing in the file executed."""
from __future__ import annotations

import builtins
import copyreg
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _jax_reference import CHECKPOINT, arrays, group
from m3ae.interop.jax_checkpoint import CheckpointFormatError, load_jax_checkpoint
from m3ae.interop.safe_pickle import Opaque, UnsafePickleError, safe_load

FOREIGN = ("flax", "jax", "jaxlib", "optax", "ml_collections", "cloudpickle", "chex", "m3ae.model_jax")


def test_checkpoint_arrays_are_recovered_bit_exactly(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle.load/loads must never be used on checkpoints")
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    ckpt = load_jax_checkpoint(CHECKPOINT)
    assert ckpt.format == "pickle" and ckpt.location == 'state.params["params"]'
    assert (ckpt.step, ckpt.state_step, ckpt.epoch, ckpt.adam_count) == (1, 2, 0, 2)
    assert ckpt.variant["m3ae.emb_dim"] == 64
    for name, table in (("params", ckpt.params), ("adam_mu", ckpt.adam_mu), ("adam_nu", ckpt.adam_nu)):
        ref = group(f"train/step2/{name}/") if name == "params" else group(f"train/step2/{name}/params/")
        assert table.keys() == ref.keys(), name
        for key, value in table.items():
            assert value.dtype == ref[key].dtype and value.shape == ref[key].shape, key
            np.testing.assert_array_equal(value, ref[key], err_msg=f"{name}/{key}")


def test_reading_imports_none_of_the_authors_packages():
    # A fresh interpreter, so nothing imported by other tests can hide an import.
    code = (
        "import sys; from m3ae.interop.jax_checkpoint import load_jax_checkpoint;"
        f"c = load_jax_checkpoint({str(CHECKPOINT)!r}); assert len(c.params) == 56;"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FOREIGN!r});"
        "print('loaded:', bad)"
    )
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded: []"


def test_placeholders_record_the_authors_objects():
    root = safe_load(CHECKPOINT)
    state = root["state"]
    assert isinstance(state, Opaque) and state.name == "m3ae.model.M3AETrainState"
    assert isinstance(state.attributes()["tx"], Opaque)  # the optax optimizer: inert


# -- hostile pickles ------------------------------------------------------------------------------
class Call:
    """Pickles as `func(*args)`: what an attacker puts in a checkpoint."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pickle wants nested calls to look callable; never called here
        raise AssertionError("not to be called")


def _hostile(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    write = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "os.system": pickle.dumps(Call(os.system, touch)),
        "posix.system protocol 0": f"cposix\nsystem\n(S'{touch}'\ntR.".encode(),
        "INST opcode": f"(S'{touch}'\nios\nsystem\n.".encode(),
        "builtins.exec": pickle.dumps(Call(builtins.exec, write)),
        "builtins.eval": pickle.dumps(Call(builtins.eval, write)),
        "builtins.open": pickle.dumps(Call(Call(getattr, Call(open, str(marker), "w"), "write"), "x")),
        "subprocess.Popen": pickle.dumps(Call(subprocess.Popen, ["touch", str(marker)])),
        "getattr(__import__('os'), 'system')": pickle.dumps(
            Call(Call(getattr, Call(builtins.__import__, "os"), "system"), touch)),
        "copyreg._reconstructor": pickle.dumps(
            Call(copyreg._reconstructor, subprocess.Popen, object, None), protocol=2),
        "inside a checkpoint": pickle.dumps(
            {"step": 1, "evil": Call(os.system, touch),
             "state": {"params": {"params": {"cls_token": np.zeros((1, 1, 4), np.float32),
                                             "image_embedding": {"kernel": np.ones((12, 4), np.float32)}}}}},
            protocol=5),
    }


@pytest.mark.parametrize("case", list(_hostile(Path("x"))))
def test_hostile_pickles_run_nothing(tmp_path, case):
    marker = tmp_path / "marker"
    data = _hostile(marker)[case]
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    try:
        result = safe_load(path)
    except pickle.UnpicklingError:
        result = None  # refused: also fine
    assert not marker.exists(), f"{case}: the pickle executed code"
    if case == "inside a checkpoint":
        assert isinstance(result["evil"], Opaque) and result["evil"].qualname == "system"
        assert result["evil"].args == (f"touch {marker}",)  # recorded, not run
        ckpt = load_jax_checkpoint(path)  # parameters still come out, the payload stays inert
        assert ckpt.params["image_embedding/kernel"].sum() == 48
    else:
        assert result is None or isinstance(result, Opaque)
        if path.read_bytes()[:1] == b"\x80":  # only pickles with a PROTO header reach the reader
            with pytest.raises((CheckpointFormatError, pickle.UnpicklingError)):
                load_jax_checkpoint(path)
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    payload = np.array([1, Call(os.system, f"touch {tmp_path / 'marker'}")], dtype=object)
    for protocol in (2, 5):
        with pytest.raises(UnsafePickleError, match="dtype"):
            safe_load(pickle.dumps(payload, protocol=protocol))
    assert not (tmp_path / "marker").exists()


def test_plain_arrays_of_every_layout_round_trip():
    values = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3),
              "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
              "strided": np.arange(10, dtype=np.int16)[::2], "scalar": np.float32(2.5),
              "bool": np.array([True, False]), "empty": np.zeros((0, 3), np.float32)}
    for protocol in (2, 3, 4, 5):
        loaded = safe_load(pickle.dumps(values, protocol=protocol))
        for key, value in values.items():
            np.testing.assert_array_equal(loaded[key], value, err_msg=f"{key} p{protocol}")
            assert np.asarray(loaded[key]).dtype == np.asarray(value).dtype


# -- msgpack and npz ------------------------------------------------------------------------------
def _pack(obj) -> bytes:
    """Minimal msgpack writer for the test (Flax's layout: arrays as ext 1 of (shape, dtype, bytes))."""
    if isinstance(obj, dict):
        head = bytes([0x80 | len(obj)]) if len(obj) < 16 else b"\xdf" + struct.pack(">I", len(obj))
        return head + b"".join(_pack(k) + _pack(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return b"\xdd" + struct.pack(">I", len(obj)) + b"".join(_pack(v) for v in obj)
    if isinstance(obj, str):
        data = obj.encode()
        return (bytes([0xA0 | len(data)]) if len(data) < 32 else b"\xdb" + struct.pack(">I", len(data))) + data
    if isinstance(obj, bytes):
        return b"\xc6" + struct.pack(">I", len(obj)) + obj
    if isinstance(obj, bool):
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        return bytes([obj]) if 0 <= obj < 128 else b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, (np.ndarray, np.generic)):
        code = 1 if isinstance(obj, np.ndarray) else 3
        arr = np.asarray(obj)
        payload = _pack([list(arr.shape), arr.dtype.name, arr.tobytes()])
        return b"\xc9" + struct.pack(">Ib", len(payload), code) + payload
    raise TypeError(type(obj))


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def test_flax_msgpack_train_state(tmp_path):
    params = group("train/step2/params/")
    mu, nu = group("train/step2/adam_mu/params/"), group("train/step2/adam_nu/params/")
    state = {"step": 2, "params": {"params": _nest(params)},
             "opt_state": {"0": {}, "1": {"0": {"count": np.int32(2), "mu": {"params": _nest(mu)},
                                                "nu": {"params": _nest(nu)}}, "1": {}}}}
    path = tmp_path / "state.msgpack"
    path.write_bytes(_pack(state))
    ckpt = load_jax_checkpoint(path)
    assert ckpt.format == "msgpack" and ckpt.state_step == 2 and ckpt.adam_count == 2
    for key, value in params.items():
        np.testing.assert_array_equal(ckpt.params[key], value)
        np.testing.assert_array_equal(ckpt.adam_nu[key], nu[key])


def test_flax_msgpack_params_only_and_bfloat16(tmp_path):
    params = dict(group("params/"))
    path = tmp_path / "params.msgpack"
    path.write_bytes(_pack(_nest(params)))
    ckpt = load_jax_checkpoint(path)
    assert ckpt.location == "top level" and ckpt.params.keys() == params.keys()
    # bfloat16 (numpy has none): stored as the top 16 bits of float32.
    from m3ae.interop.msgpack_reader import unpackb
    values = np.array([1.0, -2.5, 0.15625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    payload = _pack([[3], "bfloat16", raw])
    decoded = unpackb(b"\xc9" + struct.pack(">Ib", len(payload), 1) + payload)
    np.testing.assert_array_equal(decoded, values)


def test_npz_and_unknown_files(tmp_path):
    np.savez(tmp_path / "p.npz", **{f"params/{k}": v for k, v in group("params/").items()})
    ckpt = load_jax_checkpoint(tmp_path / "p.npz")
    assert ckpt.format == "npz" and len(ckpt.params) == len(group("params/"))
    (tmp_path / "junk.bin").write_bytes(b"hello")
    with pytest.raises(CheckpointFormatError, match="unrecognised"):
        load_jax_checkpoint(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError):
        load_jax_checkpoint(tmp_path / "missing.pkl")
    assert arrays()  # fixture present


def _ext(code: int, payload: bytes) -> bytes:
    return b"\xc9" + struct.pack(">Ib", len(payload), code) + payload


def _corrupt_files() -> dict[str, bytes]:
    loop: dict = {"cls_token": np.zeros((1, 1, 4), np.float32),
                  "image_embedding": {"kernel": np.ones((12, 4), np.float32)}}
    loop["loop"] = loop  # a tree that holds itself
    tail = _pack("image_embedding") + b"\x01"
    return {
        "pickle: self-containing parameters": pickle.dumps({"params": loop}, protocol=4),
        "pickle: BUILD on a dict": b"\x80\x02}q\x00}q\x01b.",
        "pickle: set(5)": b"\x80\x02cbuiltins\nset\nK\x05\x85R.",
        "pickle: bytes of 2**50 declared": b"\x80\x04\x8e" + struct.pack("<Q", 1 << 50) + b"abc",
        "msgpack: 200 nested arrays": b"\x81" + _pack("cls_token") + b"\x91" * 200 + b"\x01",
        "msgpack: dtype 'xyz'": b"\x82" + _pack("cls_token") + _ext(1, _pack([[2], "xyz", bytes(8)])) + tail,
        "msgpack: a shape of strings": b"\x82" + _pack("cls_token") + _ext(1, _pack([["a"], "float32", bytes(8)]))
                                        + tail,
        "msgpack: a map as a key": b"\x82\x81\x01\x02\x01" + tail,
        "msgpack: chunked array without chunks": b"\x82" + _pack("cls_token")
                                                  + _pack({"__msgpack_chunked_array__": 1, "shape": 5}) + tail,
    }


@pytest.mark.parametrize("case", list(_corrupt_files()))
def test_corrupt_checkpoints_are_a_clear_error_naming_the_file(tmp_path, case, capsys):
    # Was: RecursionError, TypeError, AttributeError, MemoryError escaped as a crash with a
    # traceback (`m3ae convert-jax` "failed"), or a numpy message that did not name the file.
    from m3ae.cli import main

    path = tmp_path / "ckpt.bin"
    path.write_bytes(_corrupt_files()[case])
    with pytest.raises((CheckpointFormatError, pickle.UnpicklingError)) as err:
        load_jax_checkpoint(path)
    assert str(err.value).startswith(str(path))
    assert main(["convert-jax", str(path), str(tmp_path / "out")]) == 2
    printed = capsys.readouterr().err
    assert "Traceback" not in printed and printed.count(str(path)) == 1, printed


def test_a_corrupt_npz_member_is_a_clear_error(tmp_path):
    params = dict(group("params/"))
    np.savez_compressed(tmp_path / "c.npz", **params)
    raw = bytearray((tmp_path / "c.npz").read_bytes())
    raw[5000:5100] = b"\xff" * 100  # inside a compressed member: zlib or CRC error, not a zip one
    (tmp_path / "c.npz").write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match=f"^{tmp_path / 'c.npz'}: .*(zip|decompress|CRC)"):
        load_jax_checkpoint(tmp_path / "c.npz")
