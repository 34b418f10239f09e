import pytest
import torch

from m3ae.viz.attention import (attention_analysis, encoder_attention, find_token, image_to_text,
                                parse_region, select_layer, text_to_image, tokenize_caption)

from viz_helpers import tiny_model


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = ["[PAD]", "[UNK]", "a", "bowl", "of", "straw", "##berries", "on", "the", "table", "red", "##dish"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def test_wordpiece_lookup():
    caption = tokenize_caption(wordpiece_tokenizer(), "A bowl of Strawberries on the table", 16)
    assert caption.tokens == ["a", "bowl", "of", "straw", "##berries", "on", "the", "table"]
    assert find_token(caption, "strawberries") == [3, 4]
    assert find_token(caption, "STRAWBERRIES") == [3, 4]
    assert find_token(caption, "##berries") == [4]
    assert find_token(caption, "table") == [7]
    with pytest.raises(ValueError, match="'banana' is not in the caption.*Strawberries"):
        find_token(caption, "banana")
    # A word cut off by the model's text length is not in the caption the model sees.
    short = tokenize_caption(wordpiece_tokenizer(), "A bowl of Strawberries on the table", 4)
    assert short.tokens == ["a", "bowl", "of", "straw"]
    with pytest.raises(ValueError, match="not in the caption"):
        find_token(short, "table")


def test_attention_maps_are_distributions():
    model = tiny_model()
    c = model.config
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 32, 32, generator=g)
    text = torch.randint(2, 40, (2, 6), generator=g)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    weights = encoder_attention(model, image, text, padding)
    assert len(weights) == c.depth
    T = 1 + c.num_patches + 6
    for w in weights:
        assert w.shape == (2, c.num_heads, T, T)
        assert (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(2, c.num_heads, T), atol=1e-5)
    w = select_layer(weights, -1)
    t2i = text_to_image(w, [1, 2], c.num_patches)
    assert t2i.shape == (2, c.num_heads, c.num_patches) == (2, 4, 16)
    assert (t2i >= 0).all() and torch.allclose(t2i.sum(-1), torch.ones(2, 4), atol=1e-5)
    assert t2i.mean(1)[0].reshape(c.grid_size, c.grid_size).shape == (4, 4)
    raw = text_to_image(w, [1], c.num_patches, renormalize=False)
    assert (raw.sum(-1) <= 1 + 1e-5).all()
    i2t = image_to_text(w, 5, c.num_patches, padding)
    assert i2t.shape == (2, 4, 6)
    assert torch.allclose(i2t.sum(-1), torch.ones(2, 4), atol=1e-5)
    assert (i2t[1, :, 4:] == 0).all()  # padding gets nothing
    assert torch.allclose(select_layer(weights, "mean").sum(-1), torch.ones(2, 4, T), atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        select_layer(weights, 5)


def test_attention_does_not_change_the_output():
    model = tiny_model()
    image = torch.randn(1, 3, 32, 32)
    text = torch.randint(2, 40, (1, 5))
    plain = model.encode(image, text)
    with_att, _ = model.encode(image, text, return_attention=True)
    assert torch.allclose(plain, with_att, atol=1e-5)


def test_analysis_and_region():
    model = tiny_model()
    caption = tokenize_caption(wordpiece_tokenizer(), "a bowl of strawberries", 16)
    result = attention_analysis(model, torch.randn(3, 32, 32), caption, find_token(caption, "strawberries"))
    assert result.text_to_image.shape == (4, 16) and result.image_to_text.shape == (4, 5)
    assert result.patch == int(result.text_to_image.mean(0).argmax())
    assert parse_region("1,2", 4) == 6
    with pytest.raises(ValueError, match="outside"):
        parse_region("4,0", 4)
    with pytest.raises(ValueError, match="ROW,COL"):
        parse_region("x", 4)
    with pytest.raises(ValueError, match="vocab_size=0"):
        encoder_attention(tiny_model(vocab_size=0), torch.randn(1, 3, 32, 32), torch.zeros(1, 2, dtype=torch.long))
