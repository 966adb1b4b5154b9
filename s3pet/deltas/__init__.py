"""PET module kinds. Each kind is one module of this package, registered by name in ``KINDS``
(see ``base.py`` for the interface: everything s3pet needs to know about a kind).

Importing this package imports every module in it, which fills ``KINDS``: a new kind is a new
file here, and nothing else names it.
"""

import importlib
import pkgutil

from s3pet.deltas.base import KINDS, Delta, DeltaKind, register, unregister  # noqa: F401

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")
