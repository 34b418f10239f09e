"""Data settings of a run (the `data:` section of a run config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    # What to read. "demo" = the built-in synthetic shapes; other specs are parsed by m3ae.data.sources.
    spec: str = "demo"
    # Tokenizer: a hub name, a tokenizer.json / vocab.txt path; None = the source's own (demo: built in).
    tokenizer: Optional[str] = None
    num_workers: int = 2
    prefetch_factor: int = 2
    normalization: str = "cc12m"
    demo_samples: int = 8192
