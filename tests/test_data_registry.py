"""Source kinds come from one registry (sources/registry.py), and the demo's synthetic shapes are a
source read by the same pipeline as every other."""
import numpy as np
import pytest
import torch

from conftest import nano_config
from m3ae.data.config import DataConfig
from m3ae.data.loader import build_train_data
from m3ae.data.normalization import normalize
from m3ae.data.sources import build_source, registry, spec_tokenizer
from m3ae.data.spec import parse_item
from m3ae.data.synthetic import render_sample

MODEL = nano_config()


def first_batches(data: DataConfig, n: int, **kw):
    batches = iter(build_train_data(data, MODEL, **kw).batches)
    return [next(batches) for _ in range(n)]


def test_demo_is_a_synthetic_source_with_options_from_the_run():
    item = parse_item("demo")
    assert (item.kind, item.path) == ("synthetic", "demo")
    ctx = registry.RunContext(seed=3, image_size=32, demo_samples=20)
    src = build_source(item, context=ctx)
    assert (len(src), src.size, src.seed) == (20, 32, 3)
    own = build_source(parse_item("synthetic:shapes#samples=5#size=16#seed=1"), context=ctx)
    assert (len(own), own.size, own.seed) == (5, 16, 1)
    rec = own.record(2)
    image, caption = render_sample(1, 2, 16)
    assert rec.caption == caption and rec.image.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="unknown synthetic set"):
        build_source(parse_item("synthetic:circles"))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        build_source(parse_item("demo#colour=red"))


def test_demo_batches_keep_the_order_and_pixels_of_the_old_sampler():
    """The demo's losses stay those of every earlier release: micro-batch m of rank r holds the
    positions [(m*world + r)*B, ...) of a per-epoch torch.randperm seeded seed*7_777_777 + epoch,
    and images are rendered pixels, normalised, never cropped or flipped."""
    data = DataConfig(spec="demo", num_workers=0, demo_samples=10)
    seed, B = 5, 4
    batches = first_batches(data, 3, seed=seed, micro_batch=B, rank=1, world_size=2)
    order = [int(i) for e in range(3)
             for i in torch.randperm(10, generator=torch.Generator().manual_seed(seed * 7_777_777 + e))]
    for m, batch in enumerate(batches):
        first = (m * 2 + 1) * B
        want = order[first:first + B]
        (part,) = batch.parts
        assert batch.step == m and part.keys == [f"demo-{i:07d}" for i in want]
        pixels = torch.stack([torch.from_numpy(np.asarray(render_sample(seed, i, 32)[0], dtype=np.float32) / 255.0)
                              .permute(2, 0, 1) for i in want])
        assert torch.equal(part.image, normalize(pixels, data.normalization))
    assert batches[0].stats["samples"] == B  # counted like any source's samples


def test_demo_mixes_with_other_sources(tmp_path):
    (tmp_path / "lines.txt").write_text("a small red circle\na large blue square\n")
    spec = f"demo@0.5,text=text:{tmp_path / 'lines.txt'}@0.5"
    assert spec_tokenizer("demo") is not None and spec_tokenizer(spec) is None  # a text file brings no words
    tok = tmp_path / "tok.json"
    spec_tokenizer("demo").save(str(tok))
    data = DataConfig(spec=spec, num_workers=0, demo_samples=16, tokenizer=str(tok))
    (batch,) = first_batches(data, 1, seed=0, micro_batch=8)
    sizes = {(p.image is not None, p.text is not None): p.size for p in batch.parts}
    assert sizes[(True, True)] == sizes[(False, True)] == 4  # the weighted slot pattern: half each


def test_a_new_source_kind_is_one_module_named_once(tmp_path, monkeypatch):
    (tmp_path / "c.toy").write_text("a red circle\na blue square above a green diamond\n")
    with pytest.raises(ValueError, match="unknown source kind 'toy'"):
        parse_item("toy:x")
    monkeypatch.setattr(registry, "MODULES", (*registry.MODULES, "toy_source"))
    assert "toy" in registry.kind_names()
    assert parse_item(str(tmp_path / "c.toy")).kind == "toy"  # from its suffix
    item = parse_item(f"toys:{tmp_path / 'c.toy'}#repeat=3")  # an alias, and its own option
    assert item.kind == "toy" and len(build_source(item)) == 6
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['image'\] \(known: \['repeat'\]\)"):
        build_source(parse_item(f"{tmp_path / 'c.toy'}#image=x"))
    # Through the whole pipeline, with the kind's own vocabulary (the run names no tokenizer).
    data = DataConfig(spec=str(tmp_path / "c.toy"), num_workers=0)
    batches = first_batches(data, 2, seed=0, micro_batch=3)
    assert all(p.image is None and p.text is not None for b in batches for p in b.parts)
    assert {k for b in batches for p in b.parts for k in p.keys} == {"toy#0", "toy#1"}


def test_every_kind_is_declared_once_and_spec_errors_name_them():
    kinds = registry.source_kinds()
    names = registry.kind_names()
    assert set(names) == {"csv", "tsv", "jsonl", "text", "wds", "hdf5", "folder", "parquet", "hf", "synthetic"}
    assert kinds["tar"] is kinds["wds"] and kinds["h5"] is kinds["hdf5"] and kinds["pq"] is kinds["parquet"]
    with pytest.raises(ValueError, match="kinds: .*synthetic"):
        parse_item("nope:x")


def test_every_data_command_reads_the_demo(tmp_path, capsys):
    from m3ae.cli import main
    from m3ae.data.images import open_image

    src = build_source(parse_item("synthetic:shapes#samples=8#size=24#seed=2"))
    assert np.array_equal(np.asarray(open_image(src.record(3).image)), np.asarray(render_sample(2, 3, 24)[0]))
    assert main(["data", "shard", "demo#samples=8#size=24", "--out", str(tmp_path / "s-%03d.tar")]) == 0
    assert main(["data", "stats", str(tmp_path / "s-000.tar")]) == 0
    out = capsys.readouterr().out
    assert "samples: 8   bad: 0" in out and "image width:  min 24" in out


def test_a_file_suffix_decides_the_kind_before_a_shard_pattern():
    # Was: any "{" made it tar shards, so README's 'part-{00000..00031}.parquet' read as broken tars.
    from m3ae.data.spec import detect_kind

    assert detect_kind("laion/part-{00000..00031}.parquet") == "parquet"
    assert detect_kind("shards/s-{000..009}.tar") == "wds"
    assert detect_kind("shards/s-{000..009}.tar.gz") == "wds"
    assert detect_kind("shards/{000..009}") == "wds"  # a pattern without a suffix is still shards
