"""Optional dependencies: which extra of the package brings each, so a missing one is answered
with the exact install command rather than a traceback."""
from __future__ import annotations

# top-level module name -> extra (pyproject.toml [project.optional-dependencies])
EXTRAS = {
    "matplotlib": "viz",
    "h5py": "data",
    "pyarrow": "data",
    "fsspec": "data",
    "sklearn": "eval",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
}


def install_command(module: str) -> str | None:
    extra = EXTRAS.get(module.split(".")[0])
    return None if extra is None else f"pip install 'm3ae[{extra}]'"


def missing_dependency(err: ImportError) -> str | None:
    """'X is not installed: pip install ...' for a missing optional module, else None."""
    name = getattr(err, "name", None)
    if "pip install" in str(err):  # raised by `require`: already says what needs it
        return str(err)
    command = install_command(name) if name else None
    if name is None or command is None:
        return None
    return f"{name.split('.')[0]} is not installed; it comes with {command}"


def require(module: str, what: str):
    """Import `module` or raise an ImportError that names what needs it and the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is None or not module.startswith(err.name.split(".")[0]):
            raise
        raise ModuleNotFoundError(f"{what} needs {module.split('.')[0]}: {install_command(module)}",
                                  name=module) from None
