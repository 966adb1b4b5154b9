"""Configs of the main job (``RunConfig``) and of the optuna, transfer and export stages."""

from __future__ import annotations

from dataclasses import dataclass

from s3pet.configs.base import Config, setting
from s3pet.configs.search import SearchConfig
from s3pet.configs.train import TrainConfig

# The main job's own defaults: sized so that search + retrain + plots take a few minutes on 2
# CPU cores (README); 0 for max_train_samples / max_eval_samples means all data. Mean pooling:
# on 2,000 examples all-MiniLM-L6-v2's own read-out (mean pooling, which it was trained with)
# scores 0.810 test accuracy against 0.778 for its pooler (README). The search's PET rate is
# SearchConfig's default (3e-3); the retrain's and the head's are higher than the stages'
# defaults: 2 epochs of 2,000 examples are few steps.
RUN_SEARCH = dict(epochs=2.0, max_train_samples=2000, max_eval_samples=500, head_lr=1e-2, pooling="mean",
                  exportable=True)
RUN_TRAIN = dict(epochs=2.0, max_train_samples=2000, max_eval_samples=500, lr=3e-3, head_lr=1e-2, pooling="mean")

OBJECTIVES = ("single", "multi")
PRUNERS = ("median", "none")
GRANULARITIES = ("auto", "module", "group")
MAPPINGS = ("depth", "stretch")
EXPORT_FORMATS = ("peft", "merged")


@dataclass
class RunConfig(Config):
    """The main job (``s3pet run`` = ``pipeline.run_all``): what it runs, and each stage's settings.

    ``RunConfig()`` is the job ``s3pet run`` runs with no flags; saved as the job's config.json.
    """

    model: str = setting("minilm", "hub id, local folder, or alias (minilm, tiny-bert, tiny-t5, tiny-gpt2, "
                                   "tiny-llama)")
    task: str = setting("rotten-tomatoes", "task card: a name (s3pet tasks) or a card file")
    space: str = setting("s3pet-m", "search space: s3pet-m | s3pet-l | unified | a space JSON")
    budget: str = setting("0.05%", "PET parameters (25000, 25k) or share of the backbone (0.05%)")
    compare: bool = setting(False, "also train a random structure and BitFit of the same budget")
    search: SearchConfig = setting(help="the search stage", factory=lambda: SearchConfig(**RUN_SEARCH),
                                   prefixed=("epochs",))
    train: TrainConfig = setting(help="the retrain stage (and the --compare baselines)",
                                 factory=lambda: TrainConfig(**RUN_TRAIN))


@dataclass
class OptunaConfig(Config):
    """The study of ``s3pet optuna`` (``optuna_search.optuna_search``); trials train with a TrainConfig."""

    trials: int = setting(help="trials this worker runs (each worker adds its own)", check="> 0")
    storage: str | None = setting(None, "study storage URL: sqlite:///study.db, postgresql://..., mysql://...; "
                                        "none: in memory")
    study: str | None = setting(None, "study name (workers with the same name and storage share it); none: from "
                                      "model, task, space, budget and objective")
    objective: str = setting("single", "single: validation metric; multi: validation metric vs PET parameters "
                                       "(NSGA-II)", choices=OBJECTIVES)
    pruner: str = setting("median", "stop weak trials at validations (single objective)", choices=PRUNERS)
    granularity: str = setting("auto", "one sampled size per module, or per role and layer group (auto: by space "
                                       "size)", choices=GRANULARITIES)
    layer_groups: int = setting(3, "layer groups per stack (group granularity)", check=">= 1")


@dataclass
class TransferConfig(Config):
    """How ``s3pet transfer`` maps a structure onto another model (``transfer.map_structure``)."""

    mapping: str = setting("depth", "onto another model: depth keeps the module count, stretch fills every layer",
                           choices=MAPPINGS)


@dataclass
class ExportConfig(Config):
    """What ``s3pet export`` writes (``export.export_run``)."""

    to: str = setting("peft", "peft: an adapter for PeftModel.from_pretrained; merged: the deltas folded into a "
                              "plain transformers model", choices=EXPORT_FORMATS)
    untrained: bool = setting(False, "allow exporting freshly initialised modules when there are no weights")
