"""Every `KEY=VALUE` setting of a run, with its type, default and meaning, read from the config
dataclasses themselves: the meaning is the comment on the field's line, else the comment block
above it (which covers the fields right below it, up to a blank line or a field with its own
comment). `m3ae pretrain --help` prints them; a test keeps every field documented."""
from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
import textwrap
from dataclasses import dataclass

# Lines at the class body's indentation only (not method bodies).
_FIELD = re.compile(r"^    (\w+)\s*:\s*[^=#]+(?:=.*?)?(?:\s+#\s?(.*))?$")
_COMMENT = re.compile(r"^    #\s?(.*)$")


@dataclass
class Setting:
    key: str
    type: str
    default: object
    meaning: str


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment (trailing, else the block right above), as one line."""
    out: dict[str, str] = {}
    block: list[str] = []
    shared = False  # the block above was used by the previous field: it covers the next ones too
    for line in inspect.getsource(cls).splitlines()[1:]:
        comment = _COMMENT.match(line)
        if comment:
            block = ([] if shared else block) + [comment.group(1).strip()]
            shared = False
            continue
        field = _FIELD.match(line)
        if field and (field.group(2) or block):
            out[field.group(1)] = (field.group(2) or " ".join(block)).strip()
        # a block comment covers the fields right below it, up to a blank line or a field's own comment
        shared = bool(field and not field.group(2) and block)
        if not shared:
            block = []
    return out


def _type_name(annotation) -> str:
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    m = re.fullmatch(r"Optional\[(.+)\]", name) or re.fullmatch(r"(.+?) \| None", name)
    return f"{m.group(1)} or null" if m else name


def settings(cls: type | None = None, prefix: str = "") -> list[Setting]:
    """The settings of `cls` (default: the whole run config), nested sections as `section.key`."""
    if cls is None:
        from .config import TrainConfig

        cls = TrainConfig
    comments = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out += settings(f.default_factory, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(Setting(prefix + f.name, _type_name(f.type), default, comments.get(f.name, "")))
    return out


def _show(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value) \
        if isinstance(value, str) else str(value)


def settings_help(width: int | None = None) -> str:
    """The settings as an aligned table for --help."""
    width = width or min(shutil.get_terminal_size((120, 20)).columns, 140)
    rows = [(s.key, f"{s.type} = {_show(s.default)}", s.meaning) for s in settings()]
    k = max(len(r[0]) for r in rows)
    t = min(max(len(r[1]) for r in rows), 30)
    lines = ["settings (KEY=VALUE after the options; applied after the --config preset):"]
    for key, kind, meaning in rows:
        head = f"  {key:<{k}}  {kind:<{t}}  "
        if len(head) > 2 + k + 2 + t + 2:  # a long type/default: the meaning goes on the next line
            lines.append(head.rstrip())
            head = " " * (2 + k + 2 + t + 2)
        wrapped = textwrap.wrap(meaning, max(width - len(head), 30)) or [""]
        lines.append(head + wrapped[0])
        lines += [" " * len(head) + w for w in wrapped[1:]]
    return "\n".join(lines)
