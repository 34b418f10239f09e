"""Pictures: loss curves, reconstructions (matplotlib's object API; no global pyplot state)."""
from __future__ import annotations

import os
from pathlib import Path


def save_figure(fig, out: str | os.PathLike, **kwargs) -> Path:
    """Write `fig` to `out` whole or not at all (a temp file renamed into place: a kill or a full disk
    mid-write leaves no half image), in the format its suffix names. Without a suffix matplotlib
    would write OUT.png and the path reported would name no file; such a path is refused."""
    from ..files import atomic_write

    out = Path(out)
    if not out.suffix:
        raise ValueError(f"{out}: a figure file needs an image suffix (.png, .jpg, .pdf, .svg)")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give a figure file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:].lower(), **kwargs))
    return out
