"""``SearchConfig``: the settings of one bi-level search (``s3pet.search``)."""

from __future__ import annotations

from dataclasses import dataclass

from s3pet.configs.base import Config, check_device, check_tensorboard, setting
from s3pet.configs.train import COMPILE, POOLINGS, PRECISIONS
from s3pet.errors import ConfigError

CONTROLLERS = ("shift", "none", "l0")  # budget controllers of the supernet
GATES = ("concrete", "hard-concrete", "deterministic")  # gate kinds of the supernet's training steps
SELECTS = ("best", "loss", "last")  # which logits of a search derive its structure


@dataclass
class SearchConfig(Config):
    """Settings of one search; saved in the run's config.json before work starts."""

    order: str = setting("first", "DARTS approximation of the alpha gradient", choices=("first", "second"))
    epochs: float = setting(3.0, "passes over D_w (fractions allowed)", check="> 0")
    max_steps: int = setting(0, "bi-level steps; 0 = from --epochs", check=">= 0")
    batch_size: int = setting(32, "examples per batch of D_w and of D_alpha", check="> 0")
    w_lr: float = setting(3e-3, "learning rate of the PET modules and head (the benchmarked default recipe; the "
                                "paper code's 3e-4 leaves fresh deltas too small for the gates to tell apart)",
                          check="> 0")
    alpha_lr: float = setting(0.1, "learning rate of the gate logits (paper code: AdamW 0.1)", check="> 0")
    head_lr: float = setting(0.0, "learning rate of the task head; 0 = --w-lr", check=">= 0")
    kind_lr_scale: float = setting(0.0, "0 = every PET module at --w-lr; > 0 = each kind at its own known-good "
                                        "rate (the one retraining uses) times this, the head at the largest",
                                   check=">= 0")
    weight_decay: float = setting(0.0, "AdamW weight decay of the PET modules and head", check=">= 0")
    grad_clip: float = setting(2.0, "max global gradient norm (paper code: 2.0); 0 = off", check=">= 0")
    warmup_ratio: float = setting(0.0, "share of the w steps with a linear learning-rate warm-up", check="[0, 1]")
    beta: float = setting(1.0, "gate sigmoid temperature", check="> 0")
    temperature: float = setting(1.0, "binary-concrete relaxation temperature", check="> 0")
    temperature_final: float = setting(0.0, "anneal the concrete temperature geometrically to this over the "
                                            "bi-level steps; 0 = no annealing", check=">= 0")
    hard: bool = setting(False, "straight-through hard gates in training steps (concrete gates only)")
    gates: str = setting("concrete", "training gates: binary concrete, hard concrete (stretched and clipped: exact "
                                     "0s and 1s) or deterministic (z = p)", choices=GATES)
    warmup_steps: int = setting(0, "steps that train only the PET modules and head, gates fixed at p, before any "
                                   "alpha step (fresh LoRA B, BitFit and LNFit are 0: no gate gradient yet)",
                                check=">= 0")
    warmup_epochs: float = setting(0.0, "the warm-up in passes over D_w instead of steps (one length across task "
                                        "sizes); 0 = --warmup-steps", check=">= 0")
    alpha_init: str = setting("zero", "after the warm-up, set alpha from each candidate's |gate x dL/dgate| "
                                      "(sensitivity needs a warm-up)", choices=("zero", "sensitivity"))
    alpha_init_scale: float = setting(1.0, "standard deviation of the sensitivity-initialised logits", check="> 0")
    sensitivity_batches: int = setting(8, "D_alpha batches the sensitivity score averages over", check="> 0")
    selector: str = setting("search", "search: the bi-level search ranks the candidates; sensitivity: the "
                                      "warmed-up sensitivity alone ranks them, no alpha steps (needs a warm-up)",
                            choices=("search", "sensitivity"))
    alpha_every: int = setting(1, "bi-level steps per alpha step: k > 1 takes an alpha step on every k-th step "
                                  "only (a first-order step then costs 1 + 1/k passes instead of 2)", check="> 0")
    alpha_accum: int = setting(1, "D_alpha micro-batches averaged per alpha step (a less noisy alpha gradient)",
                               check="> 0")
    exportable: bool = setting(False, "search only candidates that `s3pet export --to peft` or `--merge` can "
                                      "write (on in `s3pet run`)")
    restarts: int = setting(1, "independent searches (seeds seed..seed+N-1) whose gate probabilities are averaged "
                               "before the derivation", check="> 0")
    controller: str = setting("shift", "budget controller: shift (S3PET), none (plain sigmoid) or l0 (penalty "
                                       "ablation)", choices=CONTROLLERS)
    l0_weight: float = setting(1.0, "weight of the l0 controller's penalty", check=">= 0")
    xi: float = setting(0.0, "virtual step size of second order; 0 = --w-lr", check=">= 0")
    alpha_share: float = setting(0.5, "share of the training split used as D_alpha", check="(0, 1)")
    select: str = setting("best", "derive from the logits of the best validation metric (ties: the earliest), "
                                  "of the lowest validation loss, or the last ones; the run writes the other two "
                                  "as structure-<rule>.json", choices=SELECTS)
    eval_every: int = setting(0, "steps between validations; 0 = twice per epoch", check=">= 0")
    checkpoint_every: int = setting(0, "steps between checkpoints; 0 = at every validation", check=">= 0")
    max_length: int = setting(128, "tokens per input (a sentence or a pair); 0 = from the data (the 95th "
                                   "percentile of the training lengths, capped at the model's)", check=">= 0")
    pooling: str = setting("auto", "encoder read-out, as in training: auto (the model's own pooler when it has "
                                   "one, else the mean over tokens), pooler or mean", choices=POOLINGS)
    eval_batch_size: int = setting(128, "examples per validation batch", check="> 0")
    seed: int = setting(0, "seeds the D_w/D_alpha split, data order, initialisation and gate noise", check=">= 0")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    precision: str = setting("auto", "auto = bf16 autocast on a GPU, fp32 on the CPU", choices=PRECISIONS)
    shift_iters: int = setting(0, "shift-solve iterations; 0 = to tolerance on the CPU, 12 fixed (sync-free) "
                                  "steps on a GPU", check=">= 0")
    compile: str = setting("auto", "torch.compile the task model (auto: on a GPU for runs of 2,000+ steps)",
                           choices=COMPILE)
    max_train_samples: int = setting(0, "seeded training subset for quick runs; 0 = all", check=">= 0")
    max_eval_samples: int = setting(0, "cap on validation and test examples; 0 = all", check=">= 0")
    log_every: int = setting(10, "steps between history records", check="> 0")
    progress: bool = setting(True, "a progress bar on a terminal, periodic log lines otherwise")
    tensorboard: bool = setting(False, "also write history.jsonl's metrics to <run>/tb/ (needs s3pet[tensorboard])")

    def __post_init__(self):
        super().__post_init__()
        check_device(self.device)
        check_tensorboard(self.tensorboard)
        if self.hard and self.gates != "concrete":
            raise ConfigError(f"hard (straight-through) applies to concrete gates only, not {self.gates!r}")
        if self.warmup_steps and self.warmup_epochs:
            raise ConfigError("give warmup_steps or warmup_epochs, not both")
        for name in ("alpha_init", "selector"):
            if getattr(self, name) == "sensitivity" and not (self.warmup_steps or self.warmup_epochs):
                # Fresh LoRA B, BitFit and LNFit deltas are 0, so every gate gradient is 0 before training.
                raise ConfigError(f"{name}=sensitivity needs a warm-up (warmup_steps or warmup_epochs): "
                                  "untrained deltas have no sensitivity")
