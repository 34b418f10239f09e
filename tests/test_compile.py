"""torch.compile on the CPU, end to end. Compiling even the tiny model takes about a minute on 2
cores, so these run only with M3AE_COMPILE_TESTS=1 (the default suite keeps compile to single
graphs: test_model, test_cpu_attention, test_linear_cross_entropy)."""
import logging
import os

import pytest
import torch

from m3ae.checkpoint import load_train_state
from m3ae.train.loop import pretrain

from test_train import losses, params, tiny_config

pytestmark = [pytest.mark.compile,
              pytest.mark.skipif(os.environ.get("M3AE_COMPILE_TESTS") != "1",
                                 reason="compiles whole training steps (minutes): set M3AE_COMPILE_TESTS=1")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_compiled_run_stopped_and_resumed_equals_a_straight_one_bit_for_bit(tmp_path, precision):
    # The resumed process compiles its step afresh; the graphs must compute what the first one's did.
    steps = ["steps=8", "ckpt_every=100", "compile=true", f"precision={precision}"]
    straight = pretrain(tiny_config(*steps), tmp_path / "straight")
    first = pretrain(tiny_config(*steps), tmp_path / "split", stop_at_step=4)
    assert first.status == "stopped" and first.step == 4
    resumed = pretrain(tiny_config(*steps), tmp_path / "split", resume="auto")
    assert resumed.step == 8
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    a, b = params(straight.checkpoint), params(resumed.checkpoint)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = load_train_state(straight.checkpoint), load_train_state(resumed.checkpoint)
    assert torch.equal(sa["optimizer"]["state"][0]["exp_avg_sq"], sb["optimizer"]["state"][0]["exp_avg_sq"])


def test_compile_turned_on_at_a_resume_changes_the_rounding_and_with_its_static_shapes_the_masks(
        tmp_path, caplog):
    # compile is a runtime switch: the checkpoint does not record it, a resume may turn it on.
    caplog.set_level(logging.INFO, logger="m3ae")
    steps = ["steps=6", "ckpt_every=100", "precision=fp32"]
    pretrain(tiny_config(*steps), tmp_path / "straight")
    for name, extra in (("rounding", ["static_shapes=false"]), ("masks", [])):
        pretrain(tiny_config(*steps), tmp_path / name, stop_at_step=3)
        resumed = pretrain(tiny_config(*steps, "compile=true", *extra), tmp_path / name, resume="auto")
        assert resumed.step == 6
    assert "compile: False -> True (not exact: changes the float rounding)" in caplog.text
    assert "compile: False -> True (not exact: the text masks are now drawn over text_length" in caplog.text
    straight = losses(tmp_path / "straight")
    assert losses(tmp_path / "rounding") == pytest.approx(straight, abs=1e-5)
    assert losses(tmp_path / "masks")[3:] != pytest.approx(straight[3:], abs=1e-3)
