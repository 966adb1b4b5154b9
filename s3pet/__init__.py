"""s3pet: sparse structure search for parameter-efficient tuning (S3PET, Hu et al. 2022).

The Python API (``s3pet.api``, loaded on first use so that ``import s3pet`` and ``s3pet --help``
import no torch): ``search``, ``derive``, ``apply_structure``, ``retrain``, ``export``,
``load_run``, and the settings ``SearchConfig`` / ``TrainConfig``.
"""

import sys
import types
from importlib import import_module

__version__ = "0.1.0"

from s3pet.errors import S3petError  # noqa: E402,F401

# name -> module that defines it; read on first access (module ``__getattr__``)
_LAZY = {"derive": "s3pet.api", "apply_structure": "s3pet.api", "retrain": "s3pet.api", "load_run": "s3pet.api",
         "PetModel": "s3pet.petmodel", "Predictor": "s3pet.predict", "SearchConfig": "s3pet.search",
         "TrainConfig": "s3pet.train", "Structure": "s3pet.structure"}
# API functions named like a submodule: ``s3pet.search`` and ``s3pet.export`` stay the modules
# (``from s3pet.search import SearchConfig`` and every existing use keep working) and calling them
# runs ``s3pet.api.search`` / ``s3pet.api.export``.
_CALLABLE = ("search", "export")

__all__ = ["S3petError", "__version__", *_CALLABLE, *_LAZY]


class _CallableModule(types.ModuleType):
    """A submodule that, called, runs the API function of its name (``s3pet.search(...)``)."""

    def __call__(self, *args, **kwargs):
        return getattr(import_module("s3pet.api"), self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    # The import system sets each loaded submodule as an attribute of its package: this is where
    # ``s3pet.search`` and ``s3pet.export`` become callable, whoever imports them first.
    def __setattr__(self, name, value):
        if name in _CALLABLE and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _CALLABLE:
        return import_module(f"s3pet.{name}")
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 's3pet' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
