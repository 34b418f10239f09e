"""Studies: several pretraining arms (overrides of one recipe, several seeds), each evaluated the same
way, gathered into one table with plots. `m3ae study STUDY.yaml --out DIR` runs one, resumably."""
from .spec import ArmSpec, StudySpec, load_study

__all__ = ["ArmSpec", "StudySpec", "load_study"]
