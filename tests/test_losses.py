import torch

from conftest import random_batch
from m3ae.losses import normalize_patches, patch_mse, token_cross_entropy


def test_loss_ignores_visible_patches_and_padding(nano_model):
    image, text, padding = random_batch()
    masks = nano_model.make_masks(4, True, padding, None, torch.Generator().manual_seed(0))
    base = nano_model(image, text, padding, masks=masks)
    # Changing a visible patch's pixels changes the encoder input, so compare targets only: the
    # image loss must be a mean over hidden patches of the decoder predictions vs the targets.
    full = nano_model(image, text, padding, masks=masks, full_outputs=True)
    from m3ae.patches import patchify
    target = patchify(image, 8)
    per_patch = (full.image_output - target).square().mean(-1)
    expected = (per_patch * full.image_mask).sum(1) / full.image_mask.sum(1)
    assert torch.allclose(base.image_loss, expected.mean(), atol=1e-6)
    # Text: only hidden, non-padding positions count.
    logp = full.text_output.log_softmax(-1).gather(-1, text[..., None])[..., 0]
    valid = full.text_mask & ~padding
    per_sample = -(logp * valid).sum(1) / valid.sum(1).clamp_min(1)
    has = valid.sum(1) > 0
    assert torch.allclose(base.text_loss, per_sample[has].mean(), atol=1e-5)
    assert torch.allclose(base.loss, base.image_loss + 0.5 * base.text_loss, atol=1e-6)


def test_patch_mse_weighting():
    pred = torch.zeros(2, 3, 4)
    target = torch.ones(2, 3, 4)
    target[0, 0] = 3.0
    w = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.isclose(patch_mse(pred, target, w), torch.tensor(1.0))
    assert patch_mse(pred, target) > 1.0


def test_token_cross_entropy_averaging_modes():
    logits = torch.zeros(2, 3, 5)
    targets = torch.zeros(2, 3, dtype=torch.long)
    valid = torch.tensor([[1, 1, 0], [0, 0, 0]])
    ours, _ = token_cross_entropy(logits, targets, valid)
    ref, _ = token_cross_entropy(logits, targets, valid, average_over="batch")
    assert torch.isclose(ours, torch.log(torch.tensor(5.0)))
    assert torch.isclose(ref, torch.log(torch.tensor(5.0)) / 2)  # the empty sample counts as 0


def test_norm_pix_targets_are_standardised():
    x = torch.randn(2, 5, 48) * 3 + 2
    n = normalize_patches(x)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(n.std(-1), torch.ones(2, 5), atol=1e-3)


def test_one_batch_overfits(nano_model):
    image, text, padding = random_batch(batch=4, seed=3)
    masks = nano_model.make_masks(4, True, padding, None, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(nano_model.parameters(), lr=2e-3)
    first = None
    for _ in range(150):
        out = nano_model(image, text, padding, masks=masks)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < 0.25 * first
    assert out.text_accuracy.item() > 0.9
