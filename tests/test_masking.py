import pytest
import torch

from m3ae.masking import Masks, keep_count, make_masks, per_sample_text_ids


def _padding(lengths, length):
    return torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]


def test_image_masks_exact_counts_disjoint_and_per_sample():
    g = torch.Generator().manual_seed(0)
    masks = make_masks(8, num_patches=16, text_padding=None, image_ratio=0.75, text_ratio=0.75, generator=g)
    assert masks.image_keep == keep_count(16, 0.75) == 4
    for row in masks.image_ids:
        assert sorted(row.tolist()) == list(range(16))  # a permutation: kept and hidden are disjoint
    hidden = masks.image_mask()
    assert (hidden.sum(1) == 12).all()
    assert len({tuple(r.tolist()) for r in masks.image_ids[:, :4].sort(1).values}) > 1  # samples differ


def test_reference_mode_shares_one_permutation():
    g = torch.Generator().manual_seed(0)
    padding = _padding([16, 10, 3], 16)
    masks = make_masks(3, num_patches=16, text_padding=padding, image_ratio=0.75, text_ratio=0.75,
                       mode="reference", generator=g)
    assert (masks.image_ids == masks.image_ids[0]).all()
    assert (masks.text_ids == masks.text_ids[0]).all()
    assert masks.text_keep == 4  # over all 16 positions, padding included


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5, 0.75, 0.9])
def test_per_sample_text_counts_real_tokens_only_and_never_shows_padding(ratio):
    lengths = [16, 12, 7, 1, 0, 5]
    padding = _padding(lengths, 16)
    g = torch.Generator().manual_seed(1)
    ids, keep = per_sample_text_ids(padding, ratio, g)
    for row, n in enumerate(lengths):
        n_hidden = int(n * ratio + 0.5)
        kept = ids[row, :keep]
        kept_real = [i for i in kept.tolist() if not padding[row, i]]
        assert len(kept_real) == n - n_hidden
        hidden_real = [i for i in ids[row, keep:].tolist() if not padding[row, i]]
        assert len(hidden_real) == n_hidden
        assert sorted(ids[row].tolist()) == list(range(16))
        # Slots beyond this row's own keep count are padding positions, never hidden real tokens.
        assert all(padding[row, i] for i in kept.tolist()[n - n_hidden:])


def test_per_sample_text_masks_differ_between_samples():
    padding = _padding([16] * 8, 16)
    ids, keep = per_sample_text_ids(padding, 0.75, torch.Generator().manual_seed(0))
    assert len({tuple(sorted(r[:keep].tolist())) for r in ids}) > 1


def test_masks_are_deterministic_for_a_seed():
    padding = _padding([9, 4], 12)
    a = make_masks(2, num_patches=16, text_padding=padding, image_ratio=0.75, text_ratio=0.75,
                   generator=torch.Generator().manual_seed(5))
    b = make_masks(2, num_patches=16, text_padding=padding, image_ratio=0.75, text_ratio=0.75,
                   generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.image_ids, b.image_ids) and torch.equal(a.text_ids, b.text_ids)


def test_hidden_mask_helper():
    ids = torch.tensor([[2, 0, 1, 3]])
    assert Masks.hidden(ids, 2).tolist() == [[False, True, False, True]]  # 2 and 0 kept


@pytest.mark.parametrize("ratio", [0.15, 0.5, 0.75, 0.9])
def test_static_text_keep_is_fixed_and_only_adds_padding_slots(ratio):
    lengths = [16, 12, 7, 1, 5, 16, 2]
    padding = _padding(lengths, 16)
    g = torch.Generator().manual_seed(3)
    masks = make_masks(len(lengths), num_patches=None, text_padding=padding, image_ratio=0.75,
                       text_ratio=ratio, generator=g, static_text_keep=True)
    dynamic = make_masks(len(lengths), num_patches=None, text_padding=padding, image_ratio=0.75,
                         text_ratio=ratio, generator=torch.Generator().manual_seed(3))
    assert masks.text_keep == max(keep_count(16, ratio), dynamic.text_keep)
    assert torch.equal(masks.text_ids, dynamic.text_ids)  # same draw, more visible slots
    for row, n in enumerate(lengths):
        visible_real = [i for i in masks.text_ids[row, : masks.text_keep].tolist() if not padding[row, i]]
        assert len(visible_real) == n - int(n * ratio + 0.5)  # no hidden token became visible
    assert masks.text_targets.numel() == dynamic.text_targets.numel() == sum(int(n * ratio + 0.5) for n in lengths)


def test_make_masks_refuses_ratios_outside_zero_to_one():
    import pytest

    from m3ae.masking import make_masks

    for ratio in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="image_ratio must be in \\[0, 1\\)"):
            make_masks(2, num_patches=16, text_padding=None, image_ratio=ratio, text_ratio=0.75)
