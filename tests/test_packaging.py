"""Declared dependencies are used, and the missing-extra messages name extras that exist."""
import re
from pathlib import Path

import pytest

from m3ae.optional import EXTRAS

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
# distribution name -> what the library imports for it
IMPORTED_AS = {"pillow": "PIL", "pyyaml": "yaml", "scikit-learn": "sklearn", "tensorboard": "torch.utils.tensorboard"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def _imports(folder: str) -> str:
    return "\n".join(p.read_text() for p in (ROOT / folder).rglob("*.py"))


def test_every_runtime_dependency_is_imported_by_the_library():
    project = _project()
    extras = project["optional-dependencies"]
    runtime = project["dependencies"] + [r for name, reqs in extras.items() if name not in ("dev", "all")
                                         for r in reqs]
    source = _imports("src")
    unused = []
    for requirement in runtime:
        module = IMPORTED_AS.get(_name(requirement), _name(requirement).replace("-", "_"))
        if not re.search(rf"^\s*(import|from) {re.escape(module)}\b", source, re.MULTILINE):
            unused.append(requirement)
    assert unused == []


def test_the_missing_extra_messages_name_real_extras_of_imported_modules():
    extras = _project()["optional-dependencies"]
    source = _imports("src")
    for module, extra in EXTRAS.items():
        assert extra in extras, (module, extra)
        assert re.search(rf"^\s*(import|from) {module}\b|import_module\(\"{module}", source, re.MULTILINE) or (
            module == "tensorboard" and "torch.utils.tensorboard" in source), module
