from data_files import write_manifest, write_text
from m3ae.cli import main


def test_data_stats_and_shard_roundtrip(tmp_path, capsys):
    manifest = write_manifest(tmp_path, n=7)
    (tmp_path / "images" / "img002.jpg").write_bytes(b"")  # one bad image
    assert main(["data", "stats", f"{manifest},text={write_text(tmp_path)}"]) == 0
    out = capsys.readouterr().out
    assert "samples: 6" in out and "empty: 1" in out and "caption length (words)" in out and "image width" in out
    pattern = str(tmp_path / "shards" / "s-%03d.tar")
    assert main(["data", "shard", manifest, "--out", pattern, "--per-shard", "4", "--shorter-side", "20"]) == 0
    assert "wrote 6 samples to 2 shards" in capsys.readouterr().out
    assert main(["data", "stats", f"wds:{tmp_path}/shards/s-{{000..001}}.tar"]) == 0
    out = capsys.readouterr().out
    assert "samples: 6" in out and "shorter side: min 20" in out


def test_stats_of_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "stats", f"{tmp_path}/nothing-*.tar"]) == 2
    assert "error" in capsys.readouterr().err
