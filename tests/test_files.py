"""m3ae.files: atomic writes leave the old file or the new one, with the permissions open() gives."""
import os
import stat

import pytest

from m3ae.files import atomic_write


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umasks_mode(tmp_path, umask, mode):
    # Checkpoints on a shared disk must be readable as the user's umask says (mkstemp would give 0600).
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.json", lambda p: open(p, "w").write("{}"))
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == mode


def test_a_writer_that_replaces_the_file_still_leaves_the_umasks_mode(tmp_path):
    # safetensors' save_file writes its file anew, as 0600: the checkpoint must still be 0644.
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "model.safetensors", lambda p: save_file({"w": torch.zeros(2)}, str(p)))

        def replace(p):
            os.unlink(p)
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600))

        atomic_write(tmp_path / "other.bin", replace)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "other.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, lambda p: open(p, "w").write("old"))

    def half_then_fail(p):
        open(p, "w").write("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_remove_stale_removes_only_present_files_and_links(tmp_path):
    from m3ae.files import remove_stale

    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").mkdir()  # a folder of that name is not a file we wrote: it stays
    (tmp_path / "c.json").symlink_to(tmp_path / "gone")  # a dangling link is still removed
    assert remove_stale(tmp_path, ["a.json", "b.json", "c.json", "missing.json"]) == ["a.json", "c.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def _aged(path, seconds=3600):
    t = os.stat(path, follow_symlinks=False).st_mtime - seconds
    os.utime(path, (t, t), follow_symlinks=False)
    return path


def test_a_write_removes_temp_files_killed_writers_left_for_that_name_only(tmp_path):
    # Was: a writer killed between creating its temp file and renaming it left the file for good;
    # a folder saved again and again after crashes piled them up (each as large as the weights).
    import fcntl

    def temp(name, hexpart="0123456789ab"):
        path = tmp_path / f".{name}.{hexpart}.tmp"
        path.write_bytes(b"half a file")
        return path

    abandoned = _aged(temp("a.json"))
    fresh = temp("a.json", "00000000000f")  # may be a live writer's, writing now
    locked = _aged(temp("a.json", "0000000000aa"))  # a live writer that wrote nothing for an hour
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    other = _aged(temp("b.json"))  # a name this write does not write
    not_ours = [tmp_path / n for n in (".a.json.0123456789AB.tmp", ".a.json.0123456789a.tmp",
                                       ".a.json.0123456789ab.tmp.x", "a.json.0123456789ab.tmp",
                                       ".xa.json.0123456789ab.tmp")]
    for path in not_ours:
        path.write_text("the user's")
        _aged(path)
    folder = tmp_path / ".a.json.0123456789ac.tmp"
    folder.mkdir()
    _aged(folder)
    link = tmp_path / ".a.json.0123456789ad.tmp"
    link.symlink_to(other)
    _aged(link)
    try:
        atomic_write(tmp_path / "a.json", lambda p: open(p, "w").write("{}"))
    finally:
        os.close(fd)
    assert not abandoned.exists()
    assert all(p.exists() for p in [fresh, locked, other, *not_ours, folder, link])
    assert (tmp_path / "a.json").read_text() == "{}"
    # The lock released (its writer died): the next write of the name removes it.
    atomic_write(tmp_path / "a.json", lambda p: open(p, "w").write("{}"))
    assert not locked.exists() and fresh.exists()


def test_the_temp_file_of_a_killed_writer_goes_at_a_later_save_not_a_live_ones(tmp_path):
    """A real writer killed mid-write (SIGKILL: no cleanup runs) leaves its temp file, removed by
    the next save once old; a live writer's temp file, even one idle for long (its mtime aged
    here), is left to it: two saves into one folder never delete each other's files."""
    import subprocess
    import sys
    import threading

    from m3ae.files import remove_stale_temps

    code = ("import os, signal, sys; from m3ae.files import atomic_write\n"
            "def write(p):\n    open(p, 'w').write('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "atomic_write(sys.argv[1], write)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.safetensors")],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert killed.returncode == -9
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".model.safetensors.") and left.name.endswith(".tmp")
    atomic_write(tmp_path / "model.safetensors", lambda p: open(p, "w").write("new"))
    assert left.exists()  # just now written: it could be a live writer's

    started, release = threading.Event(), threading.Event()

    def slow(p):
        open(p, "w").write("slow")
        started.set()
        release.wait(60)

    writer = threading.Thread(target=atomic_write, args=(tmp_path / "model.safetensors", slow))
    writer.start()
    assert started.wait(60)
    (live,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p != left]
    _aged(live)  # idle for an hour, but its writer holds it
    _aged(left)
    try:
        assert remove_stale_temps(tmp_path, ["model.safetensors"]) == [left.name]
        assert live.exists()
    finally:
        release.set()
        writer.join(60)
    assert (tmp_path / "model.safetensors").read_text() == "slow"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_save_pretrained_and_remove_stale_take_the_temp_files_of_their_names(tmp_path):
    import torch

    from m3ae import M3AE, M3AEConfig
    from m3ae.files import remove_stale

    folder = tmp_path / "m"
    folder.mkdir()
    names = ["model.safetensors", "config.json", "preprocessor_config.json", "tokenizer.json"]
    for name in names + ["train_state.pt"]:
        (folder / f".{name}.0123456789ab.tmp").write_bytes(b"\0" * 64)
        _aged(folder / f".{name}.0123456789ab.tmp")
    torch.manual_seed(0)
    M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=0, text_length=16)).save_pretrained(
        folder)  # no tokenizer: its tokenizer.json and that file's temp files are removed (remove_stale)
    assert sorted(p.name for p in folder.iterdir()) == [".train_state.pt.0123456789ab.tmp", "config.json",
                                                        "model.safetensors", "preprocessor_config.json"]
    assert remove_stale(folder, ["train_state.pt"]) == []  # not a file there; its temp file goes
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors",
                                                        "preprocessor_config.json"]
