"""Records -> model samples, and the two datasets that feed the loader.

`MixtureDataset` (all sources indexed): global position p of the run -> (source, record) by a
fixed weighted slot pattern, so position -> sample is a pure function and resume is exact.
`StreamDataset` (any tar-shard source): each (rank, worker) share iterates its sources and
assembles whole micro-batches in the worker; its position travels in `Batch.stream`.
Randomness of a sample (crop, flip, caption drop, source choice) comes from its own seeded
generator, never from global state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .bad import BadCounter, BadSample, DataQualityError
from .collate import Collator
from .images import TrainTransform, sample_rng
from .sources.base import IndexedSource, Record, Source
from .stream_position import ShareState, StreamPosition
from .tokenizer import encode_batch

MAX_RETRIES = 16  # replacement attempts for a bad record before the position is given up


@dataclass
class SourceUse:
    """A source plus what this run takes from it."""

    source: Source
    weight: float
    image: bool  # take its images
    text: bool   # take its captions

    @property
    def paired(self) -> bool:
        return self.image and self.text


def decode_caption(caption: str | bytes | None) -> str | None:
    if caption is None:
        return None
    if not isinstance(caption, (str, bytes)):  # a JSONL manifest's "caption": 123 (or a list, an object)
        raise BadSample("bad_text", f"caption is a {type(caption).__name__}, not text")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("bad_text", "not UTF-8") from None
    else:
        try:
            caption.encode("utf-8")  # lone surrogates from surrogateescape-read manifests
        except UnicodeEncodeError:
            raise BadSample("bad_text", "not UTF-8") from None
    return caption.strip()


class SampleMaker:
    """Decodes + augments images and tokenises captions (in batches) for records of one batch."""

    def __init__(self, transform: TrainTransform, tokenizer, text_length: int, caption_drop: float = 0.0):
        self.transform = transform
        self.tokenizer = tokenizer
        self.text_length = text_length
        self.caption_drop = caption_drop

    def prepare(self, record: Record, use: SourceUse, rng: np.random.Generator) -> dict[str, Any]:
        """Everything but tokenisation. Raises BadSample."""
        if record.missing:
            raise BadSample(record.missing, record.key)
        sample: dict[str, Any] = {"key": record.key}
        caption = None
        if use.text:
            caption = decode_caption(record.caption)
            if caption is None:
                raise BadSample("missing_caption", record.key)
            if not caption:
                raise BadSample("empty", "empty caption")
        if use.image:
            if record.image is None:
                raise BadSample("missing_image", record.key)
            # Draw the caption-drop coin first so the crop does not depend on it.
            drop = use.text and self.caption_drop > 0 and rng.random() < self.caption_drop
            sample["image"] = self.transform(record.image, rng, record.key)
            if drop:
                caption = None
        if record.label is not None:
            sample["label"] = record.label
        sample["caption"] = caption
        return sample

    def tokenize(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Batched tokenisation; a caption with no tokens makes a text-only sample bad ('empty')."""
        with_text = [s for s in samples if s.get("caption")]
        if self.tokenizer is not None:
            for s, ids in zip(with_text, encode_batch(self.tokenizer, [s["caption"] for s in with_text],
                                                      self.text_length)):
                s["text"] = ids
        else:
            for s in with_text:
                s["caption"] = None
        return samples


@dataclass
class Samples:
    """The samples of one micro-batch and what travels with them to the `Batch` (typed, never
    inside a sample)."""

    items: list[dict[str, Any]]
    step: int  # the micro-batch index (seeds the masks)
    stats: dict[str, Any] = field(default_factory=dict)  # data counts since the last batch (BadCounter.take)
    stream: StreamPosition | None = None  # streams: the position of the share that made it, after it


def usable(sample: dict[str, Any]) -> bool:
    return sample.get("image") is not None or (sample.get("text") is not None and len(sample["text"]) > 0)


class SlotSchedule:
    """Weighted interleaving of sources with exact proportions over each cycle of `slots`
    positions: p -> (source, how many times that source was used before p)."""

    def __init__(self, weights: Sequence[float], seed: int, slots: int = 1000):
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        if len(w) == 1:
            slots = 1
        counts = np.maximum(np.floor(w * slots).astype(int), 1)
        while counts.sum() < slots:  # largest remainder
            counts[np.argmax(w * slots - counts)] += 1
        self.slots = int(counts.sum())
        self.counts = counts
        pattern = np.repeat(np.arange(len(w)), counts)
        self.pattern = np.random.default_rng([seed, 0x51075]).permutation(pattern)
        onehot = np.eye(len(w), dtype=np.int64)[self.pattern]
        self.before = np.vstack([np.zeros((1, len(w)), dtype=np.int64), np.cumsum(onehot, axis=0)])

    def __call__(self, position: int) -> tuple[int, int]:
        cycle, slot = divmod(position, self.slots)
        s = int(self.pattern[slot])
        return s, cycle * int(self.counts[s]) + int(self.before[slot, s])


class PositionSampler(torch.utils.data.Sampler):
    """Micro-batch m of rank r holds run positions [(m * world + r) * B, ... + B)."""

    def __init__(self, batch_size: int, start: int = 0, stop: int | None = None, rank: int = 0, world_size: int = 1):
        self.batch_size, self.start, self.stop, self.rank, self.world_size = batch_size, start, stop, rank, world_size

    def __iter__(self):
        m = self.start
        while self.stop is None or m < self.stop:
            first = (m * self.world_size + self.rank) * self.batch_size
            yield [(m, p) for p in range(first, first + self.batch_size)]
            m += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("endless sampler has no length")
        return max(self.stop - self.start, 0)


class MixtureDataset(torch.utils.data.Dataset):
    """Indexed sources only. Fetches whole batches (`__getitems__`) so captions tokenise together."""

    def __init__(self, uses: list[SourceUse], maker: SampleMaker, seed: int, counter: BadCounter | None = None):
        self.uses = uses
        # The same sources, typed: this dataset needs their length and random access.
        self.sources = [u.source for u in uses if isinstance(u.source, IndexedSource)]
        if len(self.sources) != len(uses):
            raise TypeError("MixtureDataset takes indexed sources only, got "
                            + ", ".join(u.source.describe() for u in uses if not isinstance(u.source, IndexedSource)))
        self.maker = maker
        self.seed = seed
        self.schedule = SlotSchedule([u.weight for u in uses], seed)
        self.counter = counter or BadCounter()
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:  # one epoch of the largest source; the sampler is endless anyway
        return max(len(source) for source in self.sources)

    def _index(self, s: int, k: int) -> int:
        source = self.sources[s]
        epoch, within = divmod(k, len(source))
        if (s, epoch) not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[(s, epoch)] = source.permutation(self.seed + 1000 * s, epoch)
        return int(self._perms[(s, epoch)][within])

    def prepare(self, position: int, first_attempt: int = 0) -> dict[str, Any]:
        s, k = self.schedule(position)
        use, source = self.uses[s], self.sources[s]
        n = len(source)
        for attempt in range(first_attempt, MAX_RETRIES):
            # A bad record is replaced by another of the same source, chosen deterministically.
            index = self._index(s, k) if attempt == 0 else (self._index(s, k) + attempt * 7919) % n
            try:
                record = source.record(index)
                return self.maker.prepare(record, use, sample_rng(self.seed, position, attempt))
            except BadSample as err:
                self.counter.record_bad(err.reason, f"{use.source.name}#{index}", err.detail)
        raise DataQualityError(f"{MAX_RETRIES} bad records in a row from {use.source.describe()}: "
                               f"{dict(self.counter.bad)}")

    def __getitems__(self, items: list[tuple[int, int]]) -> Samples:
        samples = [self.prepare(int(position)) for _, position in items]
        self.maker.tokenize(samples)
        for i, (_, position) in enumerate(items):
            attempt = 1
            while not usable(samples[i]):  # a caption with no tokens: replace like any bad record
                self.counter.record_bad("empty", samples[i]["key"], "no tokens")
                samples[i] = self.maker.tokenize([self.prepare(int(position), attempt)])[0]
                attempt += 1
                if attempt >= MAX_RETRIES:
                    raise DataQualityError(f"no usable sample for position {position}")
        self.counter.good += len(samples)
        return Samples(samples, int(items[0][0]), self.counter.take())

    def __getitem__(self, item):
        return self.__getitems__([item if isinstance(item, tuple) else (0, item)]).items[0]


class BatchCollator(Collator):
    """The model collator for `Samples`: their step, data stats and stream position go to the Batch,
    and, in a loader worker, the worker's CPU time since its previous batch (what making the batch
    cost, reading and decoding included; the trainer's thread policy weighs it, m3ae.threads)."""

    _cpu_mark: float | None = None  # the worker's process time at its previous batch

    def __call__(self, samples: Samples):  # type: ignore[override]
        batch = super().__call__(samples.items, samples.step)
        batch.stats, batch.stream = samples.stats, samples.stream
        if torch.utils.data.get_worker_info() is not None:  # in the training process it would be the step's
            now = time.process_time()  # this worker process's CPU time since it started
            batch.loader_cpu_s = now - (self._cpu_mark or 0.0)
            self._cpu_mark = now
        return batch


class StreamDataset(torch.utils.data.IterableDataset):
    """Any mix including stream sources. Yields collated micro-batches: worker w of W produces
    micro-batches start + w, start + w + W, ... which the DataLoader returns in order."""

    def __init__(self, uses: list[SourceUse], maker: SampleMaker, collator: BatchCollator, seed: int,
                 batch_size: int, start: int = 0, rank: int = 0, world_size: int = 1,
                 resume: StreamPosition | None = None, epochs: int | None = None,
                 bad_limit: tuple[float, int] | None = None):
        self.uses, self.maker, self.collator, self.seed = uses, maker, collator, seed
        self.batch_size, self.start, self.rank, self.world_size = batch_size, start, rank, world_size
        self.resume = resume
        self.epochs = epochs
        # (max_bad_fraction, min_samples): enforced here too, over this share's records, since a
        # stream whose records are all bad would otherwise never yield a batch for the run to check.
        self.bad_limit = bad_limit
        w = np.asarray([u.weight for u in uses], dtype=np.float64)
        self.cumulative = np.cumsum(w / w.sum())

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        # Micro-batch m comes from share m % nw: after a resume at an odd start, worker 0 continues
        # the share that produced the odd batches (keeping w would swap the shares' data).
        g, parts = self.rank * nw + (self.start + w) % nw, self.world_size * nw
        start = (self.resume or StreamPosition(parts)).share_start(g, parts, [u.source.exact for u in self.uses])
        n, positions = start.n, start.sources
        iters = [u.source.iterate(g, parts, self.seed + 1000 * i, positions[i], self.epochs)
                 for i, u in enumerate(self.uses)]
        alive = [True] * len(iters)
        counter = BadCounter()
        share = None if self.bad_limit is None else BadCounter(*self.bad_limit)  # never reset
        if share is not None and start.bad is not None:  # a resumed share goes on counting
            share.add(start.bad)

        def skip(reason: str, key: str, detail: str = "") -> None:
            counter.record_bad(reason, key, detail)  # reported with the next batch
            if share is not None:
                share.record_bad(reason, key, log_it=False)
                share.check()

        step = self.start + w
        while True:
            samples: list[dict[str, Any]] = []
            while len(samples) < self.batch_size and any(alive):
                rng = sample_rng(self.seed, g, n)
                n += 1
                s = int(np.searchsorted(self.cumulative, rng.random() * self.cumulative[-1], side="right"))
                s = min(s, len(iters) - 1)
                if not alive[s]:
                    continue
                try:
                    positions[s], record = next(iters[s])
                except StopIteration:  # only with a finite number of epochs (stats, bench)
                    alive[s] = False
                    continue
                try:
                    samples.append(self.maker.prepare(record, self.uses[s], rng))
                except BadSample as err:
                    skip(err.reason, record.key, err.detail)
            if not samples:
                return
            self.maker.tokenize(samples)
            for x in samples:
                if not usable(x):
                    skip("empty", x["key"], "no tokens")
            samples = [x for x in samples if usable(x)]
            if share is not None:
                share.good += len(samples)
            if not samples:
                continue
            counter.good += len(samples)
            position = StreamPosition(parts, {g: ShareState(n, [_plain(p) for p in positions],
                                                            None if share is None else share.as_dict())})
            yield self.collator(Samples(samples, step, counter.take(), position))
            step += nw


def _plain(p):
    return list(p) if isinstance(p, tuple) else p
