import pytest
import torch

from m3ae.data.normalization import denormalize, normalize
from m3ae.masking import Masks
from m3ae.patches import patchify
from m3ae.viz.reconstruction import (draw_masks, reconstruct, reconstruction_columns, reconstruction_figure,
                                    restore_patch_stats, to_rgb)

from viz_helpers import is_png, tiny_model


def test_unnormalise_round_trip():
    pixels = torch.rand(2, 3, 8, 8)
    for stats in ("cc12m", "imagenet", ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))):
        assert torch.allclose(denormalize(normalize(pixels, stats), stats), pixels, atol=1e-6)
    rgb = to_rgb(normalize(pixels[0], "cc12m"), "cc12m")
    assert rgb.shape == (8, 8, 3)
    assert torch.allclose(torch.from_numpy(rgb), pixels[0].permute(1, 2, 0), atol=1e-6)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, 32, 32, generator=g)
    text = torch.randint(2, 40, (2, 10), generator=g)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 7:] = True
    return image, text.masked_fill(padding, 0), padding


def test_visible_patches_are_the_input():
    model = tiny_model()
    image, text, padding = _batch()
    masks = draw_masks(model, image, padding, seed=3)
    rec = reconstruct(model, image, text, padding, masks)
    p_in, p_out = patchify(image, 8), patchify(rec.reconstruction, 8)
    visible = ~rec.image_mask
    assert visible.sum() == 2 * masks.image_keep
    assert torch.equal(p_out[visible], p_in[visible])
    assert not torch.allclose(p_out[~visible], p_in[~visible])  # hidden ones are predictions
    assert torch.equal(patchify(rec.masked, 8)[~visible], torch.zeros_like(p_in[~visible]))
    assert rec.text_prediction.shape == text.shape and rec.text_mask.shape == text.shape


def test_mask_ratio_override_and_image_only_model(tmp_path):
    model = tiny_model(vocab_size=0)
    image, _, _ = _batch()
    masks = draw_masks(model, image, None, image_ratio=0.5, seed=0)
    assert masks.image_keep == 8
    rec = reconstruct(model, image, masks=masks)
    assert rec.text is None and rec.image_mask.sum(1).tolist() == [8, 8]
    assert is_png(reconstruction_figure([("mae", rec)], tmp_path / "r.png", decode=None))


def test_norm_pix_restoration_uses_only_visible_patches():
    image, text, padding = _batch()
    patches = patchify(image, 8)
    hidden = torch.zeros(2, 16, dtype=torch.bool)
    hidden[:, [0, 5, 6, 10, 15]] = True
    pred = torch.randn(2, 16, 192)
    changed = patches.clone()
    changed[hidden] = changed[hidden] * 5 + 3  # very different hidden content
    for mode in ("local", "global"):
        a = restore_patch_stats(pred, patches, hidden, grid=4, mode=mode)
        b = restore_patch_stats(pred, changed, hidden, grid=4, mode=mode)
        assert torch.allclose(a, b)
    # ... and it does depend on the visible ones.
    moved = patches.clone()
    moved[~hidden] += 1.0
    c = restore_patch_stats(pred, moved, hidden, grid=4)
    assert torch.allclose(c[hidden], restore_patch_stats(pred, patches, hidden, grid=4)[hidden] + 1.0, atol=1e-5)

    # End to end with a norm_pix model: hidden input pixels do not change the reconstruction.
    model = tiny_model(norm_pix_loss=True)
    masks = draw_masks(model, image, padding, seed=1)
    rec1 = reconstruct(model, image, text, padding, masks)
    hid = Masks.hidden(masks.image_ids, masks.image_keep)
    p2 = patches.clone()
    p2[hid] = torch.randn_like(p2[hid]) * 4
    from m3ae.patches import unpatchify

    rec2 = reconstruct(model, unpatchify(p2, 8, 4), text, padding, masks)
    assert torch.allclose(rec1.reconstruction, rec2.reconstruction, atol=1e-5)


def test_figure_with_captions_and_variants(tmp_path):
    model = tiny_model()
    image, text, padding = _batch()
    masks = draw_masks(model, image, padding, seed=0)
    a = reconstruct(model, image, text, padding, masks)
    b = reconstruct(model, image, masks=Masks(masks.image_ids, masks.image_keep))
    decode = lambda i: f"w{i}"  # noqa: E731
    out = reconstruction_figure([("with caption", a), ("no caption", b)], tmp_path / "f.png", decode=decode)
    assert is_png(out)


def test_model_mode_restored():
    model = tiny_model()
    model.train()
    image, text, padding = _batch()
    reconstruct(model, image, text, padding)
    assert model.training


def test_true_restore_is_the_display_oracle():
    image, _, _ = _batch()
    patches = patchify(image, 8)
    hidden = torch.zeros(2, 16, dtype=torch.bool)
    hidden[:, [1, 2]] = True
    from m3ae.losses import normalize_patches
    target = normalize_patches(patches)
    # A perfect norm-pix prediction comes back as the very pixels with the patches' own statistics.
    assert torch.allclose(restore_patch_stats(target, patches, hidden, grid=4, mode="true"), patches, atol=1e-4)
    with pytest.raises(ValueError, match="local, global or true"):
        restore_patch_stats(target, patches, hidden, grid=4, mode="nearest")


def test_columns_share_the_image_mask_and_differ_only_in_the_caption():
    model = tiny_model()
    image, text, padding = _batch()
    own = torch.randint(2, 40, (2, 10), generator=torch.Generator().manual_seed(5))
    own_padding = torch.zeros(2, 10, dtype=torch.bool)
    columns = reconstruction_columns(model, image, text, padding, caption=("a long caption of many words", own,
                                                                           own_padding), seed=4)
    assert [label for label, _ in columns] == ["with caption", "no caption", "“a long caption of many…”"]
    first = columns[0][1]
    assert all(torch.equal(rec.image_mask, first.image_mask) for _, rec in columns)
    assert columns[1][1].text is None and torch.equal(columns[2][1].text, own)
    assert not first.text_mask.any()  # with a caption given, captions are the condition: nothing hidden
    # The first column is what reconstruct gives for the same seeded masks.
    masks = draw_masks(model, image, padding, text_ratio=0.0, seed=4)
    assert torch.equal(reconstruct(model, image, text, padding, masks).reconstruction, first.reconstruction)
    # Without a caption: the model's text ratio, one column.
    plain = reconstruction_columns(model, image, text, padding, seed=4)
    assert [label for label, _ in plain] == ["reconstruction"] and plain[0][1].text_mask.any()
    with pytest.raises(ValueError, match="image-only"):
        reconstruction_columns(tiny_model(vocab_size=0), image, caption=("x", own, own_padding))
