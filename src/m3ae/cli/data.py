"""`m3ae data stats SPEC` and `m3ae data shard SPEC --out PATTERN`."""
from __future__ import annotations

import argparse
import io
import sys
from collections import Counter

import numpy as np

from . import _checks as C


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="inspect data sources and write WebDataset shards")
    sub = p.add_subparsers(dest="data_command", required=True)
    s = sub.add_parser("stats", help="samples, bad samples by reason, caption lengths, image sizes")
    s.add_argument("spec", help="a data SPEC (see m3ae.data.spec)")
    s.add_argument("--tokenizer", help="count caption lengths in tokens of this tokenizer (default: words)")
    s.add_argument("--limit", type=C.positive, default=None, help="read at most this many records per source")
    s.add_argument("--text-length", type=C.positive, default=64,
                   help="count the captions longer than this, which training truncates (the run's "
                        "model.text_length; default %(default)s)")
    add_bad_data_args(s)
    s.set_defaults(func=run_stats)
    w = sub.add_parser("shard", help="write WebDataset tar shards (key.jpg/.txt/.cls) from any source")
    w.add_argument("spec")
    w.add_argument("--out", required=True, type=C.output_file,
                   help="shard pattern with an index, e.g. out/shard-%%05d.tar")
    w.add_argument("--per-shard", type=C.positive, default=1000, help="samples per shard (default %(default)s)")
    w.add_argument("--shorter-side", "--resize", dest="shorter_side", type=C.non_negative, default=256,
                   help="pre-resize: downscale so the shorter side is this, as img2dataset does (0: keep)")
    w.add_argument("--quality", type=C.integer(1, 100), default=95,
                   help="JPEG quality of re-encoded images (1..100; default %(default)s)")
    w.add_argument("--limit", type=C.positive, default=None, help="write at most this many samples")
    add_bad_data_args(w)
    w.set_defaults(func=run_shard)


def add_bad_data_args(p: argparse.ArgumentParser) -> None:
    from m3ae.data.config import DataConfig  # the training defaults: one policy for every reader

    p.add_argument("--max-bad-fraction", type=C.number(0, 1), default=DataConfig.max_bad_fraction,
                   help="stop when more than this share of a source's records is unusable "
                        "(default %(default)s; 1: never stop)")
    p.add_argument("--bad-min-samples", type=C.non_negative, default=DataConfig.bad_min_samples,
                   help="records read before --max-bad-fraction is enforced (default %(default)s)")


def _bad_counter(args: argparse.Namespace, max_logged: int):
    from m3ae.data.bad import BadCounter

    # The ranges are checked by the options' types (cli._checks).
    return BadCounter(args.max_bad_fraction, args.bad_min_samples, max_logged=max_logged)


def _percentiles(values) -> str:
    if not values:
        return "-"
    a = np.asarray(values)
    q = np.percentile(a, [0, 5, 50, 95, 100])
    return f"min {q[0]:.0f}  p5 {q[1]:.0f}  median {q[2]:.0f}  p95 {q[3]:.0f}  max {q[4]:.0f}  (mean {a.mean():.1f})"


def _decode(record, max_pixels):
    """Full decode to upright RGB (so broken files are found), or raise BadSample. The EXIF
    orientation is applied as training applies it: a re-encoded shard image carries no EXIF, so a
    phone photo would otherwise be stored sideways and its size reported turned."""
    from m3ae.data.images import _load, as_bad_sample, open_image, to_rgb, upright

    with as_bad_sample(record.key):  # whatever fails on one image is that record's bad sample
        return to_rgb(_load(upright(open_image(record.image, record.key, max_pixels))))


def _caption(record, take_text: bool) -> str | None:
    """The record's caption where the source has captions, or raise BadSample: one rule for stats
    and shard (and the same reasons training counts)."""
    from m3ae.data.bad import BadSample
    from m3ae.data.pipeline import decode_caption

    if not take_text:
        return None
    caption = decode_caption(record.caption)
    if caption is None:
        raise BadSample("missing_caption", record.key)
    if not caption:
        raise BadSample("empty", "empty caption")
    return caption


def run_stats(args: argparse.Namespace) -> int:
    from m3ae.data.bad import BadSample, DataQualityError
    from m3ae.data.images import DEFAULT_MAX_PIXELS
    from m3ae.data.sources import build_sources
    from m3ae.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    for item, source in build_sources(args.spec, default_role="labelled"):
        counter = _bad_counter(args, max_logged=0)
        stopped = None
        lengths, widths, heights = [], [], []
        labels: Counter[int] = Counter()
        unreadable_labels: list[str] = []
        take_image = "image" in source.provides and item.role != "text"
        take_text = "text" in source.provides and item.role != "image"
        for i, (_, record) in enumerate(source.iterate(0, 1, seed=0, epochs=1)):
            if args.limit is not None and i >= args.limit:
                break
            try:
                if record.missing:
                    raise BadSample(record.missing, record.key)
                caption = _caption(record, take_text)
                if take_image:
                    if record.image is None:
                        raise BadSample("missing_image", record.key)
                    w, h = _decode(record, DEFAULT_MAX_PIXELS).size
                    widths.append(w)
                    heights.append(h)
            except BadSample as err:
                counter.record_bad(err.reason, record.key, err.detail, log_it=False)
                try:
                    counter.check()
                except DataQualityError as too_many:  # report what was read, then stop (exit 1)
                    stopped = DataQualityError(f"{source.describe()}: {too_many}")
                    break
                continue
            if caption:
                lengths.append(len(tok.encode(caption, add_special_tokens=False).ids) if tok else len(caption.split()))
            if record.label is not None:
                labels[record.label] += 1
            if record.bad_label:  # usable for pretraining; evaluation leaves it out
                unreadable_labels.append(record.key)
            counter.good += 1
        print(f"{source.describe()}  (provides {', '.join(sorted(source.provides))})")
        print(f"  samples: {counter.good}   bad: {counter.total_bad} ({counter.bad_fraction:.2%})")
        for reason, n in sorted(counter.bad.items()):
            print(f"    {reason}: {n}   e.g. {', '.join(counter.examples[reason][:3])}")
        if lengths:
            unit = "tokens" if tok else "words"
            over = sum(n > args.text_length for n in lengths)
            print(f"  caption length ({unit}): {_percentiles(lengths)}; over {args.text_length}: {over}")
        if widths:
            print(f"  image width:  {_percentiles(widths)}")
            print(f"  image height: {_percentiles(heights)}")
            print(f"  shorter side: {_percentiles(np.minimum(widths, heights).tolist())}")
        if labels:
            print(f"  labels: {len(labels)} classes, {min(labels.values())}-{max(labels.values())} per class")
        if unreadable_labels:
            print(f"  unreadable labels: {len(unreadable_labels)}   e.g. {', '.join(unreadable_labels[:3])}")
        if stopped is not None:
            print("  stopped: past --max-bad-fraction (the counts above are of the records read so far)")
            raise stopped
        if counter.good == 0 and counter.total_bad:  # too few records for the fraction rule to apply
            raise DataQualityError(f"{source.describe()}: no usable sample among {counter.total_bad}: "
                                   f"{dict(counter.bad)}")
    return 0


def run_shard(args: argparse.Namespace) -> int:
    from PIL import Image

    from m3ae.data.bad import BadSample
    from m3ae.data.images import DEFAULT_MAX_PIXELS
    from m3ae.data.sources import ShardWriter, build_sources, label_space_conflicts

    counter = _bad_counter(args, max_logged=10)
    index = 0
    built = build_sources(args.spec, default_role="labelled")
    conflicts = label_space_conflicts([source for _, source in built])
    if conflicts:  # refused: written as .cls, one number would name two classes in every later evaluation
        raise ValueError(f"{'; '.join(conflicts)}. The shards' .cls labels would be one label space: shard each "
                         "source on its own, or give them the same class names")
    with ShardWriter(args.out, args.per_shard) as writer:
        for item, source in built:
            if "image" not in source.provides or item.role == "text":
                raise ValueError(f"{source.describe()} has no images: shards hold images (with their captions "
                                 "and labels); a text corpus is read as it is")
            take_text = "text" in source.provides and item.role != "image"
            for _, record in source.iterate(0, 1, seed=0, epochs=1):  # in source order
                if args.limit is not None and index >= args.limit:
                    break
                try:
                    if record.missing:
                        raise BadSample(record.missing, record.key)
                    if record.image is None:
                        raise BadSample("missing_image", record.key)
                    image = _decode(record, DEFAULT_MAX_PIXELS)
                    caption = _caption(record, take_text)  # captioned sets: no image-only samples
                except BadSample as err:
                    counter.record_bad(err.reason, record.key, err.detail)
                    counter.check()  # past --max-bad-fraction: stop (the shards so far are closed whole)
                    continue
                side = min(image.size)
                if args.shorter_side and side > args.shorter_side:
                    s = args.shorter_side / side
                    image = image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))),
                                         Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=args.quality)
                sample: dict[str, object] = {"__key__": f"{index:09d}", "jpg": buf.getvalue()}
                if caption:
                    sample["txt"] = caption
                if record.label is not None:
                    sample["cls"] = int(record.label)
                # The source's own metadata (e.g. a WebDataset sample's .json attributes) travels along.
                sample["json"] = {**(record.meta or {}), "source_key": record.key,
                                  **({"caption": caption} if caption else {})}
                writer.write(sample)
                counter.good += 1
                index += 1
    print(f"wrote {counter.good} samples to {len(writer.written)} shards ({args.out}); "
          f"skipped {counter.total_bad}: {dict(counter.bad)}", file=sys.stdout)
    return 0
