"""Runs `m3ae pretrain` with one injected fault (test_faults.py starts it as a subprocess):

    python _fault_driver.py FAULT -- PRETRAIN ARGS...

FAULT is `none`, or KIND:N with KIND one of
    raise_at       an unexpected RuntimeError at step N (a bug)
    sigkill_at     SIGKILL of the trainer at step N
    enospc_ckpt    the N-th train_state.pt write fails with ENOSPC after writing half of it
    enospc_metrics the N-th metrics row fails with ENOSPC
    kill_in_ckpt   SIGKILL between the checkpoint's files (weights written, train state not) at the N-th
    stall_data     each loader worker blocks forever at its N-th sample
or kill_ckpt:N:PHASE, SIGKILL at one point of the N-th checkpoint save of this process:
    weights        model.safetensors half written (a torn file in the temp folder)
    state          train_state.pt half written, after the weights and config
    files          every file written, none fsynced yet
    rename         every file fsynced, just before the temp folder is renamed into place
    renamed        just after the rename, before the folder is fsynced and old checkpoints pruned
    prune          while pruning: an old checkpoint renamed aside (`.old-*`), not yet deleted
"""
import errno
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

import m3ae.checkpoint as checkpoint  # noqa: E402
import m3ae.train.loop as loop  # noqa: E402
import m3ae.train.step as train_step  # noqa: E402
from m3ae.cli import main  # noqa: E402


CKPT_PHASES = ("weights", "state", "files", "rename", "renamed", "prune")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def torn(path) -> None:
    """Cut a just-written file to half its length: a write the kill interrupted."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
        f.flush()


def kill_in_checkpoint(n: int, phase: str) -> None:
    assert phase in CKPT_PHASES, phase
    armed, saves = [False], [0]
    real = {"save_checkpoint": loop.save_checkpoint, "save_file": safetensors.torch.save_file,
            "torch_save": torch.save, "fsync_file": checkpoint.fsync_file,
            "fsync_dir": checkpoint.fsync_dir, "_remove": checkpoint._remove}
    fsync_dirs = [0]

    def save_checkpoint(*args, **kwargs):  # counts this process's saves; arms the N-th
        saves[0] += 1
        armed[0] = saves[0] == n
        return real["save_checkpoint"](*args, **kwargs)

    def save_file(tensors, path, *args, **kwargs):
        real["save_file"](tensors, path, *args, **kwargs)
        if armed[0] and phase == "weights":
            torn(path)
            die()

    def torch_save(obj, path, *args, **kwargs):
        real["torch_save"](obj, path, *args, **kwargs)
        if armed[0] and phase == "state":
            torn(path)
            die()

    def fsync_file(path):
        if armed[0] and phase == "files":
            die()
        real["fsync_file"](path)

    def fsync_dir(path):  # called twice per save: on the temp folder (before the rename), on the root
        if armed[0]:
            fsync_dirs[0] += 1
            if phase == "renamed" and fsync_dirs[0] == 2:
                die()
        real["fsync_dir"](path)
        if armed[0] and phase == "rename" and fsync_dirs[0] == 1:
            die()

    def remove(path):
        if armed[0] and phase == "prune":
            os.replace(path, path.with_name(f".old-{path.name}-{os.getpid()}"))  # as _remove does first
            die()
        real["_remove"](path)

    loop.save_checkpoint = save_checkpoint
    safetensors.torch.save_file = save_file
    torch.save = torch_save
    checkpoint.fsync_file, checkpoint.fsync_dir, checkpoint._remove = fsync_file, fsync_dir, remove


def inject(fault: str) -> None:
    if fault == "none":
        return
    if fault.startswith("kill_ckpt:"):
        _, n, phase = fault.split(":")
        kill_in_checkpoint(int(n), phase)
        return
    kind, n = fault.split(":")
    n, calls = int(n), [0]

    def nth() -> bool:
        calls[0] += 1
        return calls[0] == n

    if kind in ("raise_at", "sigkill_at"):
        real_norm = train_step.grad_norm

        def norm(*args, **kwargs):  # called once per step, after the backward passes
            if nth():
                if kind == "raise_at":
                    raise RuntimeError("injected fault")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_norm(*args, **kwargs)
        train_step.grad_norm = norm
    elif kind in ("enospc_ckpt", "kill_in_ckpt"):
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            if nth():
                if kind == "kill_in_ckpt":
                    os.kill(os.getpid(), signal.SIGKILL)
                with open(path, "wb") as f:
                    f.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_save(obj, path, *args, **kwargs)
        checkpoint.torch.save = save
    elif kind == "enospc_metrics":
        real_write = loop.MetricsLog.write

        def write(self, row):
            if nth():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            return real_write(self, row)
        loop.MetricsLog.write = write
    elif kind == "stall_data":
        from m3ae.data.sources.synthetic import SyntheticShapes
        real_record = SyntheticShapes.record

        def record(self, index):  # counted per process: each loader worker stalls at its N-th sample
            if nth():
                time.sleep(600)  # a read that never returns (a FIFO, a hung network mount)
            return real_record(self, index)
        SyntheticShapes.record = record
    else:
        raise SystemExit(f"unknown fault {fault}")


if __name__ == "__main__":
    fault, sep, *args = sys.argv[1:]
    assert sep == "--"
    inject(fault)
    sys.exit(main(["pretrain", *args]))
