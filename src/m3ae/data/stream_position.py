"""Where a stream run stands, for resume: the position of every (rank, worker) share.

Streams (tar shards, Parquet, Arrow) are read in shares: share g of G (G = ranks x workers) reads
its own part of every source. Each batch carries the position of the share that made it after that
batch; the loader keeps the latest per share, the ranks' positions (disjoint shares) are merged into
the one a checkpoint saves, and resume hands each share its own back. Checkpoints hold the plain
form (`to_state`): {"parts": G, "workers": {"g": {"n": samples drawn, "sources": [position, ...],
"bad": the share's own bad-data counts (BadCounter.as_dict; absent in older checkpoints)}}}.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


@dataclass
class ShareState:
    """One share: how many samples it drew (seeds its source choices) and each source's position
    (None: not started; an int count for indexed sources; [shard slot, records read] for streams)."""

    n: int = 0
    sources: list[Any] = field(default_factory=list)
    # The share's own bad-data counts (BadCounter.as_dict), which stop a worker whose share yields
    # nothing usable: saved so a resumed share goes on counting, as an uninterrupted one would.
    bad: dict[str, Any] | None = None


@dataclass
class StreamPosition:
    parts: int  # G = ranks x workers of the run that saved it
    shares: dict[int, ShareState] = field(default_factory=dict)

    def merged(self, other: StreamPosition | None) -> StreamPosition:
        """This position updated by `other` (its shares win); a different layout replaces it."""
        if other is None:
            return self
        if other.parts != self.parts:
            return other
        return StreamPosition(self.parts, {**self.shares, **other.shares})

    @staticmethod
    def merge(positions: Iterable[StreamPosition | None]) -> StreamPosition | None:
        """Several ranks' positions (disjoint shares) as one; None when none has any."""
        out = None
        for p in positions:
            if p is not None and p.shares:
                out = p if out is None else out.merged(p)
        return out

    def share_start(self, share: int, parts: int, exact: Sequence[bool]) -> ShareState:
        """Where share `share` of `parts` starts, for sources that resume exactly or not (`exact`).
        The same layout: exactly where it stopped. Another ranks x workers layout: every share
        restarts at the slowest saved progress, at shard level (at most one shard per old share is
        read twice)."""
        if self.parts == parts and share in self.shares:
            saved = self.shares[share]
            return ShareState(saved.n, copy.deepcopy(saved.sources), copy.deepcopy(saved.bad))
        if not self.shares:
            return ShareState(0, [None] * len(exact))
        positions: list[Any] = []
        for i, indexed in enumerate(exact):
            progress = []
            for st in self.shares.values():
                p = st.sources[i]
                progress.append(0 if p is None else (p[0] if isinstance(p, (list, tuple)) else p) * self.parts)
            slowest = min(progress) // parts
            positions.append(None if slowest == 0 else (slowest if indexed else [slowest, 0]))
        return ShareState(0, positions)  # new shares, other records: their bad-data counts start afresh

    def to_state(self) -> dict[str, Any]:
        return {"parts": self.parts,
                "workers": {str(g): {"n": s.n, "sources": list(s.sources), **({} if s.bad is None else {"bad": s.bad})}
                            for g, s in sorted(self.shares.items())}}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> StreamPosition | None:
        """The plain form a checkpoint holds (None or {} -> None)."""
        if not state or state.get("parts") is None:
            return None
        try:
            shares = {int(g): ShareState(int(s["n"]), list(s["sources"]), _bad_counts(s.get("bad")))
                      for g, s in state.get("workers", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"unreadable stream position in the checkpoint's data state ({err!r}): {state}") from None
        return cls(int(state["parts"]), shares)


def _bad_counts(saved: Any) -> dict[str, Any] | None:
    """A share's saved bad-data counts, checked to be what BadCounter.add reads (None: none saved):
    a damaged state is refused here, not in a loader worker."""
    if saved is None:
        return None
    if not isinstance(saved, dict):
        raise ValueError(f"bad-data counts must be a dict, got {saved!r:.200}")
    bad, keys = saved.get("bad", {}), saved.get("bad_keys", {})
    ok = (type(saved.get("samples", 0)) is int and saved.get("samples", 0) >= 0 and isinstance(bad, dict)
          and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in bad.items())
          and isinstance(keys, dict)
          and all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in keys.values()))
    if not ok:
        raise ValueError(f"unreadable bad-data counts {saved!r:.200}")
    return saved
