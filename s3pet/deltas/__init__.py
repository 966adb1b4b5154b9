"""PET module kinds. Each kind is registered by name and declares its exact parameter count.

Importing this package fills ``KINDS``; see ``base.py`` for the interface.
"""

from s3pet.deltas.base import KINDS, Delta, DeltaKind, register  # noqa: F401
from s3pet.deltas import adapter, bitfit, ia3, lnfit, lora  # noqa: F401,E402  (fill the registry)
