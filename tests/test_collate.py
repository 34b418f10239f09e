import pytest
import torch

from conftest import nano_config
from m3ae.data.collate import Collator, pad_texts


def _sample(key, image=True, text=(3, 4, 5), label=None):
    s = {"key": key}
    if image:
        s["image"] = torch.zeros(3, 32, 32)
    if text is not None:
        s["text"] = torch.tensor(text)
    if label is not None:
        s["label"] = label
    return s


def test_groups_by_modality_and_keeps_labels_aligned():
    collate = Collator(nano_config(), seed=0)
    batch = collate([_sample("a", label=0), _sample("b", text=None, label=1), _sample("c", image=False, label=2),
                     _sample("d", text=(), label=3), _sample("e", text=(9,) * 20, label=4)], step=7)
    kinds = {(p.image is not None, p.text is not None): p for p in batch.parts}
    assert set(kinds) == {(True, True), (True, False), (False, True)}
    paired = kinds[(True, True)]
    assert paired.keys == ["a", "e"] and paired.labels.tolist() == [0, 4]
    assert paired.text.shape == (2, 16)  # truncated to text_length, padded to the longest
    assert kinds[(True, False)].keys == ["b", "d"]  # an empty caption makes an image-only sample
    assert kinds[(True, False)].labels.tolist() == [1, 3]
    assert batch.size == 5 and batch.step == 7


def test_masks_depend_only_on_seed_and_step():
    samples = [_sample("a"), _sample("b", text=(1, 2))]
    a = Collator(nano_config(), seed=3)(samples).parts[0].masks
    b = Collator(nano_config(), seed=3)(samples).parts[0].masks
    c = Collator(nano_config(), seed=4)(samples).parts[0].masks
    d = Collator(nano_config(), seed=3)(samples, step=1).parts[0].masks
    assert torch.equal(a.image_ids, b.image_ids) and not torch.equal(a.image_ids, c.image_ids)
    assert not torch.equal(a.image_ids, d.image_ids)


def test_the_step_is_an_argument_not_a_sample_field():
    with pytest.raises(ValueError, match="not in its samples"):
        Collator(nano_config())([{**_sample("a"), "step": 3}])


def test_pad_texts():
    ids, padding = pad_texts([torch.tensor([5, 6, 7]), torch.tensor([8])])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padding.tolist() == [[False, False, False], [False, True, True]]


def test_static_shapes_pad_to_text_length_with_a_fixed_text_keep():
    from m3ae.masking import keep_count

    config = nano_config()
    collate = Collator(config, seed=0, static_shapes=True)
    for texts in [(3, 4, 5), (1,), tuple(range(1, 30))]:
        part = collate([_sample("a", text=texts), _sample("b", text=(7, 8))]).parts[0]
        assert part.text.shape == (2, config.text_length)
        assert part.masks.text_keep == keep_count(config.text_length, config.text_mask_ratio)


def test_pad_texts_to_a_length():
    ids, padding = pad_texts([torch.tensor([5, 6])], length=4)
    assert ids.tolist() == [[5, 6, 0, 0]] and padding.tolist() == [[False, False, True, True]]
    import pytest

    with pytest.raises(ValueError, match="more than the padded length"):
        pad_texts([torch.tensor([1, 2, 3])], length=2)


def test_the_loaders_pin_memory_reaches_every_tensor_of_a_batch(monkeypatch):
    # DataLoader(pin_memory=True) leaves objects it does not know unpinned; a Batch must say how,
    # or every host-to-GPU copy is synchronous. CPU torch cannot pin, so pinning is recorded.
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []

    def fake_pin(t, *args, **kwargs):
        pinned.append(t)
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = Collator(nano_config(), seed=0)([_sample("a", label=0), _sample("b", text=None, label=1),
                                             _sample("c", image=False, label=2)])
    tensors = [t for p in batch.parts
               for t in (p.image, p.text, p.text_padding_mask, p.labels, p.masks.image_ids, p.masks.text_ids,
                         p.masks.text_targets) if t is not None]
    out = pin_memory([batch])[0]  # what the loader's pin thread does to each delivered list of batches
    assert len(pinned) == len(tensors) and {id(t) for t in pinned} == {id(t) for t in tensors}
    assert out.step == batch.step and [p.keys for p in out.parts] == [p.keys for p in batch.parts]
    assert all(o.masks.image_keep == p.masks.image_keep and o.masks.text_keep == p.masks.text_keep
               for o, p in zip(out.parts, batch.parts))
    assert all(torch.equal(o.image, p.image) for o, p in zip(out.parts, batch.parts) if p.image is not None)


def test_uint8_images_stay_uint8_until_model_inputs_normalises_them():
    from m3ae.data.normalization import normalize_uint8

    g = torch.Generator().manual_seed(0)
    pixels = [torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(2)]
    samples = [{**_sample(k), "image": p} for k, p in zip("ab", pixels)]
    part = Collator(nano_config(), seed=0, pixel_stats="imagenet")(samples).parts[0]
    assert part.image.dtype == torch.uint8 and part.pixel_stats == "imagenet"
    moved = part.to("cpu")  # moves (and pins) as uint8: 4x fewer bytes than float32
    assert moved.image.dtype == torch.uint8 and moved.pixel_stats == "imagenet"
    image = moved.model_inputs()["image"]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(image, (torch.stack(pixels).float() / 255 - mean) / std)
    assert torch.equal(image, torch.stack([normalize_uint8(p, "imagenet") for p in pixels]))


def test_uint8_images_without_stats_are_refused_and_mixed_groups_normalised():
    pixel = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    with pytest.raises(ValueError, match="pixel_stats"):
        Collator(nano_config(), seed=0)([{**_sample("a"), "image": pixel}])
    # A float rendering (synthetic source) beside a uint8 photo in one group: all float, normalised.
    collate = Collator(nano_config(), seed=0, pixel_stats="cc12m")
    part = collate([{**_sample("a"), "image": pixel}, _sample("b")]).parts[0]
    assert part.image.dtype == torch.float32 and part.pixel_stats is None
    torch.testing.assert_close(part.image[0, :, 0, 0], (1 - torch.tensor([0.5762, 0.5503, 0.5213]))
                               / torch.tensor([0.3207, 0.3169, 0.3307]))
    assert torch.equal(part.image[1], torch.zeros(3, 32, 32))
