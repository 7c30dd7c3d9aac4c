"""Old flat module paths (``singan_insert.transforms``, ...) keep working, with one warning.

Version 0.1 had every module side by side in the package; 0.2 groups them by concept. A
meta-path finder aliases each old name to its new module (the same module object, so
``isinstance``, pickles and monkeypatching behave as before) and warns once with the new path.
One table here instead of a shim file per old module keeps the package folder showing the design.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED_MODULES = {
    "singan_insert.pyramid": "singan_insert.harmonizer.pyramid",
    "singan_insert.networks": "singan_insert.harmonizer.networks",
    "singan_insert.training": "singan_insert.harmonizer.training",
    "singan_insert.training_slice": "singan_insert.harmonizer.training_slice",
    "singan_insert.model_file": "singan_insert.harmonizer.model_file",
    "singan_insert.intensity": "singan_insert.insertion.intensity",
    "singan_insert.paste": "singan_insert.insertion.placement",
    "singan_insert.volume": "singan_insert.insertion.insert",
    "singan_insert.transforms": "singan_insert.integrations.torchio",
    "singan_insert.simulation": "singan_insert.datasets.phantom",
    "singan_insert.metrics": "singan_insert.evaluation.metrics",
    "singan_insert.baselines": "singan_insert.evaluation.baselines",
    "singan_insert.figures": "singan_insert.evaluation.figures",
    "singan_insert.demo": "singan_insert.evaluation.demo",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec):
        warnings.warn(
            f"{spec.name} moved to {self.new_name}; import it from there "
            "(the old path will be removed in a later release).",
            DeprecationWarning,
            stacklevel=4,
        )
        return importlib.import_module(self.new_name)

    def exec_module(self, module) -> None:  # the new module is already executed
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED_MODULES.get(fullname)
        if new_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new_name))


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
