"""`m3ae tokenizer train CORPUS --vocab-size N --out FILE`: a BERT-uncased-style WordPiece vocabulary."""
from __future__ import annotations

import argparse
from . import _checks as C


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a WordPiece tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train on a text corpus (.txt lines, or a CSV/JSONL caption column)")
    t.add_argument("corpus", nargs="+", help="text sources: corpus.txt, captions.csv, text:FILE#COLUMN")
    t.add_argument("--vocab-size", type=C.positive, default=30522,
                   help="tokens in the vocabulary, special tokens included (default %(default)s)")
    t.add_argument("--min-frequency", type=C.positive, default=2,
                   help="a word piece must occur this many times to be kept (default %(default)s)")
    t.add_argument("--cased", action="store_true", help="keep case (default: lower-case like BERT uncased)")
    t.add_argument("--out", required=True, type=C.output_file, help="tokenizer.json to write")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from m3ae.data.bad import BadCounter
    from m3ae.data.sources import build_source
    from m3ae.data.spec import parse_item
    from m3ae.data.tokenizer import source_texts, train_wordpiece

    sources = []
    for c in args.corpus:
        item = parse_item(c if "=" in c.split(":")[0] else f"text={c}")
        sources.append(build_source(item))

    counter = BadCounter(max_logged=10)
    tok = train_wordpiece(source_texts(sources, counter), args.vocab_size, args.min_frequency,
                          lowercase=not args.cased)
    tok.save(args.out)
    skipped = f"; skipped {counter.total_bad}: {dict(counter.bad)}" if counter.total_bad else ""
    print(f"wrote {args.out}: {tok.get_vocab_size()} tokens from {counter.good} texts{skipped}")
    return 0
