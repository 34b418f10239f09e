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
