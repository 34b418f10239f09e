"""The trainer's viz_every hook: grids at every K steps, and no effect on the training itself."""
from m3ae.train.config import load_config
from m3ae.train.loop import pretrain
from m3ae.viz.training import fixed_viz_batch, write_viz

from viz_helpers import is_png, tiny_model

TINY = ["model.image_size=32", "model.patch_size=8", "model.emb_dim=32", "model.depth=1", "model.num_heads=2",
        "model.dec_emb_dim=32", "model.dec_depth=1", "model.dec_num_heads=2", "steps=4", "batch_size=4",
        "data.num_workers=0", "data.demo_samples=32", "progress=false", "log_every=1", "device=cpu",
        "ckpt_every=100"]


def test_pretrain_writes_grids_without_changing_training(tmp_path):
    with_viz = pretrain(load_config("demo", TINY + ["viz_every=2"]), tmp_path / "a")
    without = pretrain(load_config("demo", TINY), tmp_path / "b")
    assert is_png(tmp_path / "a" / "viz" / "step_00000002.png")
    assert is_png(tmp_path / "a" / "viz" / "step_00000004.png")
    assert not (tmp_path / "b" / "viz").exists()
    assert [r["loss"] for r in with_viz.history] == [r["loss"] for r in without.history]


def test_write_viz_direct(tmp_path):
    config = load_config("demo", TINY)
    batch = fixed_viz_batch(config, n=2)
    again = fixed_viz_batch(config, n=2)
    assert batch.keys == again.keys and (batch.masks.image_ids == again.masks.image_ids).all()
    model = tiny_model(vocab_size=32)
    model.train()
    path = write_viz(model, 7, tmp_path, batch, decode=lambda i: f"w{i}", stats="cc12m")
    assert path == tmp_path / "viz" / "step_00000007.png" and is_png(path)
    assert model.training


def test_a_failing_picture_is_a_logged_warning_not_a_stop(tmp_path, caplog):
    import logging

    from m3ae.viz.training import TrainingViz

    caplog.set_level(logging.WARNING, logger="m3ae")
    config = load_config("demo", TINY)
    broken = TrainingViz(tmp_path, fixed_viz_batch(config, n=2))
    wrong_width = tiny_model(vocab_size=32, image_size=64)  # the batch's 32 px images do not fit
    assert broken(wrong_width, 3) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "step 3: reconstruction grid failed" in caplog.records[0].getMessage()
    caplog.clear()
    assert fixed_viz_batch(load_config("demo", TINY + ["data.spec=" + str(tmp_path / "missing.tar")])) is None
    assert "reconstruction grids disabled" in caplog.records[0].getMessage()
