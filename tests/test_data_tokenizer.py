import os

import pytest

from data_files import caption, write_text
from m3ae.data.tokenizer import encode_batch, load_tokenizer, train_wordpiece


def test_train_save_and_load_json(tmp_path):
    tok = train_wordpiece([caption(i) for i in range(100)], vocab_size=120, min_frequency=1)
    assert tok.token_to_id("[PAD]") == 0
    path = str(tmp_path / "tok.json")
    tok.save(path)
    loaded = load_tokenizer(path)
    ids = encode_batch(loaded, ["A DOG runs", "the dog"], max_length=64)
    assert ids[0].tolist() == encode_batch(loaded, ["a dog runs"], 64)[0].tolist()  # lower-cased
    assert all(0 not in t.tolist() for t in ids)  # no special tokens, no padding inside
    assert len(encode_batch(loaded, [" ".join(["dog"] * 100)], max_length=64)[0]) == 64


def test_bert_vocab_txt(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "dog", "run", "##s", "the"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer(str(path))
    assert encode_batch(tok, ["A dog runs!"], 64)[0].tolist() == [4, 5, 6, 7, 1]
    assert load_tokenizer(str(tmp_path)).get_vocab_size() == len(vocab)  # a folder with vocab.txt


def test_missing_tokenizer_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_cli_tokenizer_train(tmp_path, capsys):
    from m3ae.cli import main

    corpus = write_text(tmp_path, n=50)
    with open(corpus, "ab") as f:  # a line it cannot use: counted, not silently dropped
        f.write(b"caf\xe9 latin-1\n")
    out = str(tmp_path / "trained.json")
    assert main(["tokenizer", "train", corpus, "--vocab-size", "100", "--min-frequency", "1", "--out", out]) == 0
    assert os.path.exists(out) and load_tokenizer(out).get_vocab_size() <= 100
    printed = capsys.readouterr().out
    assert "from 50 texts; skipped 1: {'bad_text': 1}" in printed, printed
