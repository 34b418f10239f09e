"""m3ae.optim: the gradients' global norm, and clipping folded into the fused AdamW step."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from m3ae.optim import build_optimizer, clip_grad_norm, grad_norm, step_clipped


def _model_with_grads(scale: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return model


def test_grad_norm_is_the_norm_of_all_gradients_together_in_any_dtype():
    model = _model_with_grads(1.0)
    model[2].to(torch.bfloat16)  # a second dtype: its own _foreach_norm group
    model[2].weight.grad = model[2].weight.grad.bfloat16()
    model[1].bias.grad = None  # parameters without a gradient are skipped
    flat = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    norm = grad_norm(model.parameters())
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), flat.norm(), rtol=1e-6, atol=0)
    assert grad_norm(nn.Linear(2, 2).parameters()).item() == 0.0  # no gradients at all


@pytest.mark.parametrize("scale", [10.0, 1e-3], ids=["clipped", "below-the-limit"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_step_clipped_updates_as_clipping_then_stepping(scale, fused):
    """The fused optimizer divides by the clip inside its kernel; the weights after a few steps match
    clipping the gradients in place (optax's rule) and stepping, to fp32 rounding."""
    folded, explicit = _model_with_grads(scale), _model_with_grads(scale)
    opt_folded = build_optimizer(folded, lr=1e-2, weight_decay=0.05, fused=fused)
    opt_explicit = build_optimizer(explicit, lr=1e-2, weight_decay=0.05, fused=False)
    for step in range(3):
        for a, b in zip(folded.parameters(), explicit.parameters()):
            a.grad = torch.randn_like(a, generator=torch.Generator().manual_seed(step)) * scale
            b.grad = a.grad.clone()
        norm = grad_norm(folded.parameters())
        step_clipped(opt_folded, norm, max_norm=1.0)
        assert clip_grad_norm(explicit.parameters(), 1.0) == norm
        opt_explicit.step()
        assert not hasattr(opt_folded, "grad_scale")  # the attribute is the step's only
    for a, b in zip(folded.parameters(), explicit.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    moved = sum((a - p).abs().sum() for a, p in zip(folded.parameters(), _model_with_grads(scale).parameters()))
    assert moved > 0


def test_clipping_changes_the_update_and_none_means_no_clipping():
    """A cap below the norm changes the Adam moments (the step itself is scale-free, so compare
    exp_avg); max_norm None leaves them as the raw gradients give."""
    moments = {}
    for max_norm in (None, 0.01):
        model = _model_with_grads(5.0)
        opt = build_optimizer(model, lr=1e-2, weight_decay=0.0, fused=True)
        step_clipped(opt, grad_norm(model.parameters()), max_norm)
        moments[max_norm] = opt.state[model[0].weight]["exp_avg"].clone()
        raw = _model_with_grads(5.0)[0].weight.grad
    torch.testing.assert_close(moments[None], 0.1 * raw)
    ratio = moments[0.01] / moments[None]
    assert torch.allclose(ratio, ratio.flatten()[0]) and ratio.flatten()[0] < 0.01


def test_a_grad_scale_already_set_is_left_to_its_owner():
    """GradScaler sets optimizer.grad_scale itself: then the clip is applied to the gradients and
    the attribute is not touched."""
    model = _model_with_grads(10.0)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0, fused=True)
    opt.grad_scale = torch.tensor(1.0)
    norm = grad_norm(model.parameters())
    step_clipped(opt, norm, 1.0)
    assert opt.grad_scale.item() == 1.0
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    torch.testing.assert_close(clipped, torch.tensor(1.0), rtol=1e-5, atol=0)


def test_param_groups_see_through_compile_and_data_parallel_wrappers():
    # Was: a torch.compile'd model's parameters are named _orig_mod.*, so its no_weight_decay() names
    # matched none and every LayerNorm, bias and token was decayed.
    from m3ae import M3AE, M3AEConfig
    from m3ae.optim import param_groups

    model = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8))
    sizes = [len(g["params"]) for g in param_groups(model, 0.05)]
    assert sizes[1] > 0
    for wrapped in (torch.compile(model), nn.DataParallel(model), torch.compile(nn.DataParallel(model))):
        assert [len(g["params"]) for g in param_groups(wrapped, 0.05)] == sizes
