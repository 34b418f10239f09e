"""Tokenizers on HF `tokenizers`, with the paper's conventions: no special tokens, truncate to
`text_length` (64); padding happens in the collator (to the longest caption, with a mask).

`load_tokenizer` accepts a local tokenizer.json, a BERT vocab.txt, or a hub name such as
`bert-base-uncased` (downloaded once, then read from the local HF cache). It is the project's one
tokenizer loader: training, checkpoints, the Python API and every command read tokenizers with it."""
from __future__ import annotations

import os
import warnings
from typing import Iterable, Sequence

import torch

# Workers are forked; the Rust thread pool must not be started before the fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def wordpiece_from_vocab(vocab_file: str, lowercase: bool = True):
    """A BERT-style WordPiece tokenizer from a vocab.txt (BERT normaliser and pre-tokeniser)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece.from_file(vocab_file, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None,
                                                clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def load_tokenizer(name_or_path: str | os.PathLike, lowercase: bool = True, vocab_size: int | None = None):
    """A tokenizer.json, a BERT vocab.txt, a folder holding one, or a hub name; padding and
    truncation settings saved in the file are switched off (see `neutralise`); with `vocab_size`,
    a tokenizer whose ids would not fit the model is refused."""
    tokenizer = neutralise(_read_tokenizer(os.fspath(name_or_path), lowercase), os.fspath(name_or_path))
    if vocab_size is not None:
        check_vocab_size(tokenizer, vocab_size, os.fspath(name_or_path))
    return tokenizer


def _read_tokenizer(name_or_path: str, lowercase: bool):
    from tokenizers import Tokenizer

    if os.path.isdir(name_or_path):
        for candidate in ("tokenizer.json", "vocab.txt"):
            if os.path.exists(os.path.join(name_or_path, candidate)):
                return _read_tokenizer(os.path.join(name_or_path, candidate), lowercase)
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {name_or_path}")
    if os.path.exists(name_or_path):
        if name_or_path.endswith(".json"):
            try:
                return Tokenizer.from_file(name_or_path)
            except Exception as err:  # noqa: BLE001 - the Rust parser's errors: name the file
                raise ValueError(f"{name_or_path} is not a tokenizers JSON file: {err}") from None
        return wordpiece_from_vocab(name_or_path, lowercase)
    if name_or_path.endswith((".json", ".txt")) or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer file not found: {name_or_path}")
    try:  # a hub name: the hub, or the local HF cache when offline (HF_HUB_OFFLINE=1)
        return Tokenizer.from_pretrained(name_or_path)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; one clear message instead
        raise FileNotFoundError(
            f"could not load tokenizer {name_or_path!r} from the Hugging Face hub or its local cache "
            f"({err}); pass a local tokenizer.json or vocab.txt, or train one with `m3ae tokenizer train`"
        ) from None


def neutralise(tokenizer, source: str = "tokenizer"):
    """Switch off padding and truncation stored in a tokenizer file (most saved HF tokenizers carry
    them): padded ids would be taken for text, since M3AE pads in the collator with a mask and
    truncates to `text_length` itself. Warns when something was switched off."""
    found = [name for name, value in (("padding", tokenizer.padding), ("truncation", tokenizer.truncation))
             if value is not None]
    if found:
        warnings.warn(f"{source}: its {' and '.join(found)} settings are ignored (M3AE pads in the "
                      "collator, with a padding mask, and truncates to the model's text_length)", stacklevel=3)
        tokenizer.no_padding()
        tokenizer.no_truncation()
    return tokenizer


def check_vocab_size(tokenizer, vocab_size: int, source: str = "the tokenizer") -> None:
    """A tokenizer whose ids reach past the model's embedding table is refused (clear message)."""
    # The largest id + 1, not the number of tokens: a tokenizer.json may number its tokens sparsely
    # ({"dog": 1000000000}), and that id would fail the embedding lookup mid-run.
    count = tokenizer.get_vocab_size()
    size = max(count, max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1)
    if vocab_size <= 0:
        raise ValueError(f"the model is image-only (vocab_size=0); it takes no text ({source})")
    if size > vocab_size:
        sparse = f" (its ids reach {size - 1})" if size != count else ""
        raise ValueError(f"{source} has {count} tokens but the model's vocab_size is {vocab_size}{sparse}; "
                         "use the run's tokenizer, or set model.vocab_size to at least its size")


def source_texts(sources, counter=None) -> Iterable[str]:
    """Every usable caption of `sources` (one pass in source order); bad (not UTF-8) or empty ones
    are skipped, and counted by reason in `counter` (a BadCounter) when one is given."""
    from .bad import BadSample
    from .pipeline import decode_caption

    for source in sources:
        for _, record in source.iterate(0, 1, seed=0, epochs=1):
            try:
                text = decode_caption(record.caption)
                if not text:
                    raise BadSample("empty", "empty caption")
            except BadSample as err:
                if counter is not None:
                    counter.record_bad(err.reason, record.key, err.detail)
                continue
            if counter is not None:
                counter.good += 1
            yield text


def train_wordpiece(texts: Iterable[str], vocab_size: int = 30522, min_frequency: int = 2,
                    lowercase: bool = True):
    """Train a BERT-uncased-style WordPiece vocabulary. [PAD]=0 and [UNK]=1 are its only specials
    (0 is the collator's padding id). Not reproducible across processes: the trainer orders tied
    tokens through a randomly seeded hash map, so ship the file when runs must be repeatable."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None,
                                                clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=["[PAD]", "[UNK]"], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_batch(tokenizer, texts: Sequence[str], max_length: int) -> list[torch.Tensor]:
    """Token ids without special tokens, truncated to max_length; one batched call."""
    if not texts:
        return []
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [torch.tensor(e.ids[:max_length], dtype=torch.long) for e in encodings]
