"""A source kind defined outside the package, for tests/test_data_registry.py: one file with a `KINDS`
tuple is all a new kind needs (plus its module's name in registry.MODULES)."""
from m3ae.data.sources.base import IndexedSource, Record
from m3ae.data.sources.registry import SourceKind
from m3ae.data.synthetic import build_demo_tokenizer


class ToyCaptions(IndexedSource):
    """One caption per line of a .toy file, text only."""

    kind = "toy"
    provides = frozenset({"text"})

    def __init__(self, path: str, repeat: int = 1):
        self.name = path
        with open(path, encoding="utf-8") as f:
            self.lines = [line.strip() for line in f if line.strip()] * repeat

    def __len__(self) -> int:
        return len(self.lines)

    def record(self, index: int) -> Record:
        return Record(key=f"toy#{index}", caption=self.lines[index])


KINDS = (SourceKind("toy", lambda item, role, context: ToyCaptions(item.path, int(item.options.get("repeat", 1))),
                    frozenset({"repeat"}), aliases=("toys",), suffixes=(".toy",), tokenizer=build_demo_tokenizer),)
