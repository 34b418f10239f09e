"""DDP / FSDP2 on 2 CPU processes (gloo), against one process with the same global batch."""
import logging
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from m3ae.data.collate import Batch, BatchPart, Collator
from m3ae.data.loader import TrainData
from m3ae.masking import Masks
from m3ae.train.config import load_config

TINY = ["model.image_size=16", "model.patch_size=4", "model.emb_dim=32", "model.depth=2", "model.num_heads=4",
        "model.dec_emb_dim=16", "model.dec_depth=1", "model.dec_num_heads=2", "model.vocab_size=40",
        "model.text_length=10", "device=cpu", "progress=false", "log_every=1", "ckpt_every=100",
        "optim.lr=1e-2", "optim.warmup_steps=0", "steps=3", "batch_size=8", "grad_accum=2",
        # fp32: bf16 (auto on CPUs with native bf16) rounds differently when the batch is split
        "precision=fp32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_micro_batch(config, m: int, rows: int) -> Batch:
    """Micro-batch m of the whole job (all ranks), masks drawn over it: a pure function of m."""
    g = torch.Generator().manual_seed(1000 + m)
    c = config.model
    samples = [{"image": torch.randn(3, c.image_size, c.image_size, generator=g),
                "text": torch.randint(1, c.vocab_size, (int(torch.randint(2, c.text_length + 1, (1,), generator=g)),),
                                      generator=g).tolist(), "key": str(i)} for i in range(rows)]
    return Collator(c, seed=7)(samples, m)


def _rows(batch: Batch, lo: int, hi: int) -> Batch:
    """Rows [lo, hi) with their per-sample masks (the kept count stays the global one: still valid)."""
    p = batch.parts[0]
    m = p.masks
    masks = Masks(m.image_ids[lo:hi], m.image_keep, m.text_ids[lo:hi], m.text_keep)
    return Batch([BatchPart(p.image[lo:hi], p.text[lo:hi], p.text_padding_mask[lo:hi], masks, p.keys[lo:hi])],
                 batch.step)


def _fake_data(config, *, micro_batch, start_micro_batch=0, rank=0, world_size=1, **_):
    def gen():
        m = start_micro_batch
        while True:
            yield _rows(_global_micro_batch(config, m, micro_batch * world_size),
                        rank * micro_batch, (rank + 1) * micro_batch)
            m += 1
    return TrainData(gen(), "test rows")


def _run(rank, world_size, port, out, overrides, resume):
    import m3ae.train.loop as loop
    from m3ae.distributed import cleanup, init_distributed

    # world_size 1 runs in the test process itself: put back everything patched here.
    saved_env, saved_build = dict(os.environ), loop.build_train_data
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = load_config(None, TINY + overrides)
    loop.build_train_data = lambda data, model, **kw: _fake_data(config, **kw)
    info = init_distributed("cpu")
    try:
        result = loop.pretrain(config, out, dist=info, resume=resume,
                               allow_changes=True)  # resumes extend the run: steps 3 -> 5
        from m3ae import M3AE
        from m3ae.checkpoint import latest_checkpoint
        weights = M3AE.from_pretrained(latest_checkpoint(out)).state_dict()
        torch.save({"weights": weights, "losses": [r["loss"] for r in result.history]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        cleanup()
        loop.build_train_data = saved_build
        os.environ.clear()
        os.environ.update(saved_env)


def _launch(world_size, out, overrides=(), resume=None):
    os.makedirs(out, exist_ok=True)
    if world_size == 1:
        _run(0, 1, _free_port(), str(out), list(overrides), resume)
    else:
        mp.spawn(_run, args=(world_size, _free_port(), str(out), list(overrides), resume), nprocs=world_size)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]


def _close(a, b, rtol=1e-4, atol=1e-4):
    # The attention key bias (middle third of qkv.bias) has a zero true gradient (softmax is
    # shift-invariant), so Adam turns float noise there into lr-sized moves: left out.
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("qkv.bias"):
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=k)


def test_ddp_matches_one_process_and_resumes_in_one(tmp_path, caplog):
    one = _launch(1, tmp_path / "one")[0]
    two = _launch(2, tmp_path / "two")
    # Rank 0 writes the checkpoint; both ranks read it back, and the loss history is global.
    _close(two[0]["weights"], two[1]["weights"], rtol=0, atol=0)
    _close(one["weights"], two[0]["weights"])
    assert one["losses"] == pytest.approx(two[0]["losses"], rel=1e-5)
    # A checkpoint written by 2 ranks resumes in 1 process and continues like the 1-process run.
    _launch(1, tmp_path / "one", ["steps=5"], resume="auto")  # 1 process: steps 3 -> 5
    cont_one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    caplog.set_level(logging.WARNING, logger="m3ae")
    cont_two = _launch(1, tmp_path / "two", ["steps=5"], resume="auto")[0]
    assert "processes 2 -> 1 (not exact" in caplog.text  # said, though this synthetic run continues alike
    _close(cont_one["weights"], cont_two["weights"])
    assert cont_one["losses"] == pytest.approx(cont_two["losses"], rel=1e-4)


def _fsdp_supported() -> str | None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        return f"no FSDP2 in this torch: {err}"
    return None


@pytest.mark.skipif(_fsdp_supported() is not None, reason=str(_fsdp_supported()))
def test_fsdp2_matches_one_process(tmp_path):
    one = _launch(1, tmp_path / "one")[0]
    two = _launch(2, tmp_path / "fsdp", ["distributed.fsdp=true"])
    _close(two[0]["weights"], two[1]["weights"], rtol=0, atol=0)
    _close(one["weights"], two[0]["weights"])
    # An FSDP checkpoint (gathered full state) resumes in one plain process.
    _launch(1, tmp_path / "fsdp", ["steps=4"], resume="auto")


def test_pick_device_names_what_is_wrong():
    from m3ae.distributed import pick_device

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            pick_device("cuda")


@pytest.mark.skipif(_fsdp_supported() is not None, reason=str(_fsdp_supported()))
def test_fsdp2_eval_and_viz_on_rank0(tmp_path):
    """eval_every / viz_every under FSDP: the ranks gather the full weights, rank 0 evaluates."""
    import json

    from _eval_util import write_shard

    write_shard(tmp_path / "eval.tar.gz", 16, classes=4)
    evals = [f"eval_train={tmp_path / 'eval.tar.gz'}", f"eval_val={tmp_path / 'eval.tar.gz'}"]
    _launch(2, tmp_path / "fsdp", ["distributed.fsdp=true", "steps=2", "viz_every=2", "eval_every=2", *evals])
    rows = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "knn_top1" in r] == [2]
    assert (tmp_path / "fsdp" / "viz" / "step_00000002.png").stat().st_size > 0
