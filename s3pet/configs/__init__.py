"""The stage configs: one dataclass per stage, each field with its default, help and checks.

Torch-free, so the command line (``s3pet.flags``, ``s3pet.cli``) builds its flags from them
without loading torch. ``s3pet.train`` and ``s3pet.search`` re-export their stage's config.
"""

from s3pet.configs.base import (CHECKS, Config, check_device, check_fields, check_numbers, field_types, flag_of,
                                setting)
from s3pet.configs.search import CONTROLLERS, GATES, SELECTS, SearchConfig
from s3pet.configs.stages import (EXPORT_FORMATS, GRANULARITIES, MAPPINGS, OBJECTIVES, PRUNERS, RUN_SEARCH, RUN_TRAIN,
                                  ExportConfig, OptunaConfig, RunConfig, TransferConfig)
from s3pet.configs.train import COMPILE, POOLINGS, PRECISIONS, TrainConfig

__all__ = ["CHECKS", "COMPILE", "CONTROLLERS", "Config", "EXPORT_FORMATS", "ExportConfig", "GATES", "GRANULARITIES",
           "MAPPINGS", "OBJECTIVES", "OptunaConfig", "POOLINGS", "PRECISIONS", "PRUNERS", "RUN_SEARCH", "RUN_TRAIN",
           "RunConfig", "SELECTS", "SearchConfig", "TrainConfig", "TransferConfig", "check_device", "check_fields",
           "check_numbers", "field_types", "flag_of", "setting"]
