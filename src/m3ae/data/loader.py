"""Build the training loader for a data spec: samples -> `Batch` of modality parts with masks."""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..config import M3AEConfig
from .collate import Batch, Collator
from .config import DataConfig
from .sampler import IndexedBatchSampler
from .synthetic import SyntheticShapes


@dataclass
class TrainData:
    """An endless iterable of micro-batches plus what a checkpoint needs to resume it."""

    batches: Iterable[Batch]
    description: str
    tokenizer: Any = None
    exact_resume: bool = True  # indexed sources resume exactly; streams resume at shard level

    def state(self, next_micro_batch: int) -> dict[str, Any]:
        return {"next_micro_batch": next_micro_batch, "exact": self.exact_resume}


def _quiet_worker(_: int) -> None:
    # Ctrl-C / SIGTERM go to the main process, which finishes the step and checkpoints;
    # workers must not die first and break the loader.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def indexed_loader(dataset: torch.utils.data.Dataset, model_config: M3AEConfig, data: DataConfig, *,
                   seed: int, micro_batch: int, start_micro_batch: int = 0, rank: int = 0,
                   world_size: int = 1, stop: int | None = None) -> torch.utils.data.DataLoader:
    sampler = IndexedBatchSampler(len(dataset), micro_batch, seed=seed, start=start_micro_batch,
                                  stop=stop, rank=rank, world_size=world_size)
    workers = max(int(data.num_workers), 0)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=Collator(model_config, seed, rank),
        num_workers=workers, worker_init_fn=_quiet_worker if workers else None,
        prefetch_factor=data.prefetch_factor if workers else None,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
    )


def build_train_data(data: DataConfig, model_config: M3AEConfig, *, seed: int, micro_batch: int,
                     start_micro_batch: int = 0, rank: int = 0, world_size: int = 1) -> TrainData:
    if data.spec == "demo":
        dataset = SyntheticShapes(data.demo_samples, model_config.image_size, model_config.text_length,
                                  seed=seed, stats=data.normalization)
        if dataset.tokenizer.get_vocab_size() > model_config.vocab_size and model_config.has_text:
            raise ValueError(f"the demo vocabulary has {dataset.tokenizer.get_vocab_size()} words but the "
                             f"model's vocab_size is {model_config.vocab_size}")
        loader = indexed_loader(dataset, model_config, data, seed=seed, micro_batch=micro_batch,
                                start_micro_batch=start_micro_batch, rank=rank, world_size=world_size)
        return TrainData(loader, f"synthetic shapes ({len(dataset)} samples)", dataset.tokenizer)
    raise ValueError(f"unknown data spec {data.spec!r} (this build knows: 'demo')")
