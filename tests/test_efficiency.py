"""The fast step computes the same thing as the reference-style one (heads everywhere)."""
import pytest
import torch

from m3ae import M3AE, M3AEConfig
from m3ae.data.collate import pad_texts
from m3ae.masking import make_masks


def tiny(**kw):
    cfg = dict(image_size=16, patch_size=4, emb_dim=32, depth=2, num_heads=4, dec_emb_dim=16, dec_depth=1,
               dec_num_heads=2, vocab_size=50, text_length=12)
    cfg.update(kw)
    return M3AE(M3AEConfig(**cfg)).double()


def batch(b=5, seed=0, image=True, text=True):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, 3, 16, 16, generator=g, dtype=torch.float64) if image else None
    ids = pad = None
    if text:
        lengths = torch.randint(1, 13, (b,), generator=g).tolist()
        ids, pad = pad_texts([torch.randint(0, 50, (n,), generator=g) for n in lengths])
    return img, ids, pad


def loss_and_grads(model, full, **inputs):
    model.zero_grad()
    out = model(**inputs, full_outputs=full)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("masking", ["per_sample", "reference"])
@pytest.mark.parametrize("parts", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("head_depth", [0, 1])
def test_loss_only_heads_match_full_heads(masking, parts, head_depth):
    torch.manual_seed(0)
    model = tiny(masking=masking, output_head_depth=head_depth)
    img, ids, pad = batch(image=parts[0], text=parts[1])
    masks = make_masks(5, num_patches=16 if img is not None else None, text_padding=pad,
                       image_ratio=0.75, text_ratio=0.75, mode=masking, generator=torch.Generator().manual_seed(1))
    inputs = dict(image=img, text=ids, text_padding_mask=pad, masks=masks)
    fast, g_fast = loss_and_grads(model, False, **inputs)
    full, g_full = loss_and_grads(model, True, **inputs)
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=1e-7)
    for name in ("image_loss", "text_loss", "text_accuracy"):
        a, b = getattr(fast, name), getattr(full, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert g_fast.keys() == g_full.keys()
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_hand_made_masks_without_target_index():
    """Masks without the precomputed loss-target index (fixtures, hand-made) give the same loss."""
    torch.manual_seed(0)
    model = tiny()
    img, ids, pad = batch()
    masks = make_masks(5, num_patches=16, text_padding=pad, image_ratio=0.75, text_ratio=0.75,
                       generator=torch.Generator().manual_seed(2))
    with_index = model(img, ids, pad, masks=masks).loss
    masks.text_targets = None
    torch.testing.assert_close(model(img, ids, pad, masks=masks).loss, with_index, rtol=1e-6, atol=0)


def test_text_head_sees_only_real_hidden_tokens(monkeypatch):
    import m3ae.model as model_module

    torch.manual_seed(0)
    model = tiny()
    img, ids, pad = batch()
    masks = make_masks(5, num_patches=16, text_padding=pad, image_ratio=0.75, text_ratio=0.75,
                       generator=torch.Generator().manual_seed(3))
    rows = []
    fused = model_module.linear_cross_entropy

    def spy(hidden, *args, **kwargs):
        rows.append(hidden.shape[0])
        return fused(hidden, *args, **kwargs)

    monkeypatch.setattr(model_module, "linear_cross_entropy", spy)
    model(img, ids, pad, masks=masks)
    n_real = (~pad).sum(1).double()
    expected = int(torch.floor(n_real * 0.75 + 0.5).sum())
    assert rows == [expected]


def test_static_shapes_give_the_same_loss():
    """Extra visible slots that are padding (static shapes) change nothing but the shapes."""
    torch.manual_seed(0)
    model = tiny()
    img, ids, pad = batch()
    length = 12
    full_ids = torch.zeros(5, length, dtype=torch.long)
    full_pad = torch.ones(5, length, dtype=torch.bool)
    full_ids[:, : ids.shape[1]], full_pad[:, : ids.shape[1]] = ids, pad
    dynamic = make_masks(5, num_patches=16, text_padding=full_pad, image_ratio=0.75, text_ratio=0.75,
                         generator=torch.Generator().manual_seed(4))
    static = make_masks(5, num_patches=16, text_padding=full_pad, image_ratio=0.75, text_ratio=0.75,
                        generator=torch.Generator().manual_seed(4), static_text_keep=True)
    assert static.text_keep > dynamic.text_keep  # short captions: the fixed count is larger
    a, ga = loss_and_grads(model, False, image=img, text=full_ids, text_padding_mask=full_pad, masks=dynamic)
    b, gb = loss_and_grads(model, False, image=img, text=full_ids, text_padding_mask=full_pad, masks=static)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-7, atol=1e-9)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-6, atol=1e-9, msg=name)
    assert static.text_targets.numel() == dynamic.text_targets.numel()  # same loss-carrying tokens
