"""Bad-data accounting: a sample that cannot be used raises `BadSample(reason)`; the pipeline
skips it, counts it per reason, logs its key, and stops the run past `max_bad_fraction`."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger("m3ae.data")

REASONS = (
    "missing_image",    # the file a manifest names does not exist / no image member in a shard group
    "missing_caption",  # a paired source gave no caption
    "empty",            # zero-byte image or empty caption
    "undecodable",      # not an image PIL can identify or decode
    "truncated",        # image data ends early
    "too_large",        # above the pixel limit (decompression bomb guard)
    "bad_text",         # caption / label bytes are not UTF-8 or not a number
    "truncated_tar",    # a tar shard ends in the middle of a member
    "bad_table",        # a Parquet row group / Arrow batch that cannot be read (one per row it holds)
    "not_a_file",       # a path names a directory, device or FIFO, not a regular file
)


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DataQualityError(RuntimeError):
    """Too much of the data is unusable: stop rather than train on a silently shrunken set."""


class LoaderError(RuntimeError):
    """The loader could not deliver a batch: a worker process died (killed, out of memory)."""


class BadCounter:
    """Counts used and skipped samples; `check` raises once the skipped share passes the limit
    (only after `min_samples` attempts, so one early bad file does not stop a run)."""

    def __init__(self, max_bad_fraction: float = 0.05, min_samples: int = 200, max_logged: int = 20):
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.max_logged = max_logged
        self.good = 0
        self.bad: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        # Lines logged so far. Not reset by `take`: workers take their counts every batch, so a
        # limit on the counts since the last take let every batch log up to max_logged lines (an
        # endless log, and memory wherever the output is kept, on data with many bad samples).
        self.logged = 0

    def record_bad(self, reason: str, key: str, detail: str = "", log_it: bool = True) -> None:
        self.bad[reason] += 1
        keys = self.examples.setdefault(reason, [])
        if len(keys) < 5:
            keys.append(key)
        if log_it and self.logged < self.max_logged:
            self.logged += 1
            log.warning("skipping bad sample %s: %s %s", key, reason, detail)
            if self.logged == self.max_logged:
                log.warning("further bad samples are counted, not logged")

    def add(self, stats: dict[str, Any]) -> None:
        """Merge a per-batch stats dict (see `as_dict`) from a worker."""
        self.good += int(stats.get("samples", 0))
        for reason, n in stats.get("bad", {}).items():
            self.bad[reason] += n
        for reason, keys in stats.get("bad_keys", {}).items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(keys[: max(0, 5 - len(mine))])

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def bad_fraction(self) -> float:
        seen = self.good + self.total_bad
        return self.total_bad / seen if seen else 0.0

    def check(self) -> None:
        seen = self.good + self.total_bad
        if seen >= self.min_samples and self.bad_fraction > self.max_bad_fraction:
            raise DataQualityError(
                f"{self.total_bad} of {seen} samples were unusable ({self.bad_fraction:.1%} > "
                f"max_bad_fraction {self.max_bad_fraction:.1%}): {dict(self.bad)}; "
                f"example keys: {self.examples}")

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.good, "bad": dict(self.bad), "bad_keys": {k: list(v) for k, v in self.examples.items()}}

    def take(self) -> dict[str, Any]:
        """The counts so far, then reset (per-batch reports from workers)."""
        out = self.as_dict()
        self.good, self.bad, self.examples = 0, Counter(), {}
        return out


def worker_message(err: BaseException) -> str:
    """The error's own message. torch re-raises an exception from a loader worker with the worker's
    whole traceback as its message ("Caught X in DataLoader worker process N. Original Traceback
    ..."); the message the code raised is its last line, after the exception's name."""
    text = str(err)
    if not (text.startswith("Caught ") and "DataLoader worker" in text and "Original Traceback" in text):
        return text
    last = text.rstrip().splitlines()[-1]
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
