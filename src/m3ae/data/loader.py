"""Build the training loader for a data spec: samples -> `Batch` of modality parts with masks.

Resume: the trainer saves `TrainData.state(next_micro_batch)` and passes it back as
`resume_state` (and its "next_micro_batch" as `start_micro_batch`). Indexed sources resume
exactly (the micro-batch index is enough); streams resume where each (rank, worker) share's
last delivered batch ended, provided ranks x workers is unchanged, else at shard level.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, cast

import torch

from ..config import M3AEConfig
from .bad import BadCounter, DataQualityError, LoaderError
from .collate import Batch
from .config import DataConfig, stream_shares
from .images import TrainTransform
from .pipeline import BatchCollator, MixtureDataset, PositionSampler, SampleMaker, SourceUse, StreamDataset
from .stream_position import StreamPosition

log = logging.getLogger("m3ae.data")

DEFAULT_TOKENIZER = "bert-base-uncased"


class TrackedBatches:
    """Wraps the loader: merges each batch's data stats, enforces max_bad_fraction, and keeps the
    stream position of the last delivered batch of every (rank, worker) share."""

    def __init__(self, loader: Iterable[Batch], counter: BadCounter, stream: StreamPosition | None = None):
        self.loader = loader
        self.counter = counter
        self.stream = stream

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        try:
            yield from self._tracked(batches)
        finally:  # an error (or close()) stops the workers now, not at interpreter exit
            stop_workers(batches)

    def _tracked(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            if batch.stats:
                self.counter.add(batch.stats)
                self.counter.check()
            if batch.stream is not None:
                self.stream = batch.stream if self.stream is None else self.stream.merged(batch.stream)
            yield batch


@dataclass
class TrainData:
    """An endless iterable of micro-batches plus what a checkpoint needs to resume it."""

    batches: Iterable[Batch]
    description: str
    tokenizer: Any = None
    exact_resume: bool = True  # indexed sources resume exactly; streams resume at shard level
    counter: BadCounter = field(default_factory=BadCounter)

    def state(self, next_micro_batch: int) -> dict[str, Any]:
        out: dict[str, Any] = {"next_micro_batch": next_micro_batch, "exact": self.exact_resume,
                               "counter": self.counter.as_dict()}
        if isinstance(self.batches, TrackedBatches) and self.batches.stream is not None:
            # Only the local rank's shares; merge_data_states gathers every rank's.
            out["stream"] = self.batches.stream.to_state()
        return out

    def stats(self) -> dict[str, Any]:
        """Samples used and skipped (by reason, with example keys) so far on this rank."""
        return {**self.counter.as_dict(), "bad_fraction": self.counter.bad_fraction}


def merge_data_states(local: dict[str, Any], every_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """`local` (this rank's `TrainData.state`) with the stream positions of every rank's shares
    merged in: the one state rank 0 saves, in which each rank finds its own on resume."""
    stream = StreamPosition.merge(StreamPosition.from_state(s.get("stream")) for s in every_rank)
    merged = {**local, "counters": [s.get("counter") for s in every_rank]}  # each rank's own, by rank
    return merged if stream is None else {**merged, "stream": stream.to_state()}


def restore_counter(counter: BadCounter, state: dict[str, Any] | None, rank: int, world_size: int) -> None:
    """This rank's bad-data counts from a checkpoint's data state: without them a resumed run's
    `bad_samples` and its max_bad_fraction check started again from zero, unlike an uninterrupted
    run's. Saved by another number of processes (a run that is not exact anyway): not restored."""
    if not state:
        return
    counters = state.get("counters")
    saved = state.get("counter") if world_size == 1 and counters is None else None
    if isinstance(counters, list) and len(counters) == world_size:
        saved = counters[rank]
    if not isinstance(saved, dict):
        return
    try:
        counter.add(saved)
    except (TypeError, ValueError, AttributeError) as err:  # a hostile or damaged train state
        log.warning("bad-data counts of the checkpoint not restored (%s: %s)", type(err).__name__, err)


def next_batch(batches: Iterator[Batch]) -> Batch:
    """next(batches), with a dead loader worker named as such (LoaderError)."""
    try:
        return next(batches)
    except Exception as err:
        named = loader_error(err)
        if named is None:
            raise
        raise named from err


def loader_error(err: BaseException) -> LoaderError | None:
    """A LoaderError for an error that means a loader worker died, else None. Its death surfaces in
    several ways: a broken connection, or torch's RuntimeError from the SIGCHLD handler, which can
    go off anywhere in the main process (also mid-step)."""
    if isinstance(err, LoaderError):
        return err
    if isinstance(err, (ConnectionError, EOFError)):
        return LoaderError(f"a data loader worker died ({type(err).__name__}: {err}); killed, or out of memory?")
    if isinstance(err, RuntimeError) and not isinstance(err, DataQualityError) and "DataLoader worker" in str(err):
        return LoaderError(f"{err} (killed, or out of memory?)")
    return None


def stop_workers(batches: Any) -> None:
    """Stop the worker processes behind a batch iterator now. A worker ignores SIGTERM (below), so
    one left to multiprocessing's exit handler (terminate, then join) would hang the exit forever.
    Errors are ignored: the loop is ending anyway, and torch's SIGCHLD handler reports a dead worker
    again while the others are joined."""
    try:
        if hasattr(batches, "_shutdown_workers"):  # a DataLoader iterator: None to each worker, join
            batches._shutdown_workers()
        elif hasattr(batches, "close"):  # a generator over one (TrackedBatches): its finally stops them
            batches.close()
    except Exception:
        pass


def _quiet_worker(_: int) -> None:
    # Ctrl-C / SIGTERM go to the main process, which finishes the step and checkpoints;
    # workers must not die first and break the loader.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the trainer dies (even by SIGKILL), so no worker
    outlives it, whatever it is blocked in."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(1)


def _loader_kwargs(data: DataConfig, pin_memory: bool) -> dict[str, Any]:
    workers = max(int(data.num_workers), 0)
    return dict(num_workers=workers, worker_init_fn=_quiet_worker if workers else None,
                prefetch_factor=data.prefetch_factor if workers else None,
                persistent_workers=False, pin_memory=pin_memory)


def source_uses(data: DataConfig, model_config: M3AEConfig, seed: int = 0) -> list[SourceUse]:
    """Open every source of the spec (errors surface here, before training) and decide what each gives."""
    from .sources import RunContext, WebDatasetSource, build_sources, label_space_conflicts

    built = build_sources(data.spec, RunContext(seed, model_config.image_size, data.demo_samples))
    # Said, not refused: the objective never reads labels; batches carry them (Batch parts' labels)
    # for whoever does, numbered as each source numbers them.
    for line in label_space_conflicts([source for _, source in built]):
        log.warning("the batches' labels mix label spaces: %s", line)
    uses = []
    for item, source in built:
        if hasattr(source, "shuffle_block"):  # tar shards, tables: read in a shuffled order (see WebDatasetSource)
            source.shuffle_block = data.shuffle_buffer
        if isinstance(source, WebDatasetSource):  # bounded reads of tar members (see iter_tar)
            source.max_member_bytes, source.max_shard_bytes = data.max_member_bytes, data.max_shard_bytes
        image = "image" in source.provides and item.role != "text"
        text = "text" in source.provides and item.role != "image" and model_config.has_text
        if not (image or text):
            raise ValueError(f"{source.describe()} gives nothing this model can use "
                             f"(provides {sorted(source.provides)}, role {item.role or 'default'})")
        if item.role == "paired" and model_config.has_text and not (image and text):
            raise ValueError(f"{source.describe()} was named paired= but provides {sorted(source.provides)}: "
                             "pairs need images and captions (use image= or text= for one of them)")
        uses.append(SourceUse(source, item.weight, image, text))
    return uses


def make_sample_maker(data: DataConfig, model_config: M3AEConfig, uses: list[SourceUse], tokenizer=None,
                      train: bool = True, uint8: bool = False) -> SampleMaker:
    """Samples for training: `uint8` leaves images as uint8 pixels for the batch to normalise where
    it lands (see BatchPart.model_inputs)."""
    from .sources import spec_tokenizer
    from .tokenizer import check_vocab_size, load_tokenizer

    name = data.tokenizer or DEFAULT_TOKENIZER
    if tokenizer is None and any(u.text for u in uses):
        own = None if data.tokenizer else spec_tokenizer(data.spec)  # e.g. the synthetic shapes' words
        tokenizer, name = (own, "the spec's own vocabulary") if own is not None else (load_tokenizer(name), name)
    if tokenizer is not None and model_config.has_text:
        check_vocab_size(tokenizer, model_config.vocab_size, f"tokenizer {name}")
    transform = TrainTransform(model_config.image_size, scale=(data.crop_scale_min, data.crop_scale_max),
                               flip=data.hflip, stats=data.normalization, draft=data.jpeg_draft,
                               max_pixels=data.max_image_pixels, square=data.square, pad_value=data.pad_value,
                               jpeg_decoder=data.jpeg_decoder, uint8=uint8)
    return SampleMaker(transform, tokenizer, model_config.text_length, data.caption_drop if train else 0.0)


def build_train_data(data: DataConfig, model_config: M3AEConfig, *, seed: int, micro_batch: int,
                     start_micro_batch: int = 0, rank: int = 0, world_size: int = 1,
                     resume_state: dict[str, Any] | None = None, static_shapes: bool = False,
                     pin_memory: bool = False) -> TrainData:
    """The training batches for `data`. `static_shapes`: fixed text shapes (see Collator).
    `pin_memory`: page-locked batches, for a run whose device is a GPU (the copy then overlaps)."""
    if not 0.0 <= data.caption_drop <= 1.0:
        raise ValueError(f"caption_drop must be in [0, 1], got {data.caption_drop}")
    if data.shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0 (0: shard order), got {data.shuffle_buffer}")
    uses = source_uses(data, model_config, seed)
    # Images travel as uint8 (4x fewer bytes through worker queues and to the GPU) and are
    # normalised on the step's device.
    maker = make_sample_maker(data, model_config, uses, uint8=True)
    counter = BadCounter(data.max_bad_fraction, data.bad_min_samples)
    restore_counter(counter, resume_state, rank, world_size)
    collator = BatchCollator(model_config, seed, rank, static_shapes, pixel_stats=data.normalization)
    description = " + ".join(f"{u.source.describe()}@{u.weight:g}" for u in uses)
    if all(u.source.exact for u in uses):
        dataset: torch.utils.data.Dataset = MixtureDataset(uses, maker, seed)
        sampler = PositionSampler(micro_batch, start=start_micro_batch, rank=rank, world_size=world_size)
        # The DataLoader hands collate_fn what __getitems__ returns (Samples); torch's stub says a list.
        collate = cast(Callable[[list[Any]], Any], collator)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                             **_loader_kwargs(data, pin_memory))
        return TrainData(TrackedBatches(loader, counter), description, maker.tokenizer, True, counter)
    stream = StreamPosition.from_state((resume_state or {}).get("stream"))
    dataset = StreamDataset(uses, maker, collator, seed, micro_batch, start=start_micro_batch, rank=rank,
                            world_size=world_size, resume=stream,
                            bad_limit=(data.max_bad_fraction, data.bad_min_samples))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, **_loader_kwargs(data, pin_memory))
    # Shares that deliver nothing before the next checkpoint keep their old position.
    same_layout = stream is not None and stream.parts == stream_shares(data, world_size)
    tracked = TrackedBatches(loader, counter, stream if same_layout else None)
    return TrainData(tracked, description, maker.tokenizer, False, counter)
