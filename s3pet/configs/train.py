"""``TrainConfig``: the settings of one training run (retrain, baseline, transfer, optuna trials)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from s3pet.configs.base import Config, check_device, check_tensorboard, setting
from s3pet.errors import ConfigError

POOLINGS = ("auto", "pooler", "mean")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE = ("auto", "on", "off")  # torch.compile settings (s3pet.accel)


@dataclass
class TrainConfig(Config):
    """Settings of one training run (retrain, baseline); saved in the run's config.json."""

    epochs: float = setting(3.0, "passes over the training split (fractions allowed)", check="> 0")
    max_steps: int = setting(0, "optimizer steps; 0 = from --epochs", check=">= 0")
    batch_size: int = setting(32, "examples per micro-batch", check="> 0")
    lr: float = setting(0.0, "learning rate of every PET module; 0 = each kind's known-good rate "
                             "(LoRA 5e-4, the others 1e-3)", check=">= 0")
    full_lr: float = setting(5e-5, "learning rate when every backbone weight trains (full fine-tuning)", check="> 0")
    head_lr: float = setting(0.0, "learning rate of the task head; 0 = the largest rate of the trained modules "
                                  "(--full-lr in full fine-tuning)", check=">= 0")
    lr_scale: float = setting(1.0, "multiplies every learning rate above (what a learning-rate grid varies)",
                              check="> 0")
    pooling: str = setting("auto", "encoder read-out: auto = the model's own pooler when it has one (as "
                                   "AutoModelForSequenceClassification), else the mean over tokens",
                           choices=POOLINGS)
    weight_decay: float = setting(0.0, "AdamW weight decay", check=">= 0")
    warmup_ratio: float = setting(0.06, "share of the steps with a linear learning-rate warm-up", check="[0, 1]")
    grad_clip: float = setting(1.0, "max global gradient norm; 0 = off", check=">= 0")
    grad_accum: int = setting(1, "micro-batches per optimizer step", check="> 0")
    eval_every: int = setting(0, "steps between validations; 0 = once per epoch", check=">= 0")
    patience: int = setting(0, "validations without improvement before stopping; 0 = never stop early",
                            check=">= 0")
    max_length: int = setting(128, "tokens per input (a sentence or a pair); 0 = from the data (the 95th "
                                   "percentile of the training lengths, capped at the model's)", check=">= 0")
    eval_batch_size: int = setting(128, "examples per validation/test batch", check="> 0")
    seed: int = setting(0, "seeds the data order, the initialisation and subsampling", check=">= 0")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    precision: str = setting("auto", "auto = bf16 autocast on a GPU, fp32 on the CPU", choices=PRECISIONS)
    max_train_samples: int = setting(0, "seeded training subset for quick runs; 0 = all", check=">= 0")
    max_eval_samples: int = setting(0, "cap on validation and test examples; 0 = all", check=">= 0")
    log_every: int = setting(10, "steps between history records", check="> 0")
    progress: bool = setting(True, "a progress bar on a terminal, periodic log lines otherwise")
    tensorboard: bool = setting(False, "also write history.jsonl's metrics to <run>/tb/ (needs s3pet[tensorboard])")
    compile: str = setting("auto", "torch.compile the model (auto: on a GPU for runs of 2,000+ steps, where the "
                                   "minutes of compiling pay off)", choices=COMPILE)
    # Differentially private training (s3pet.dp; needs the extra s3pet[dp], i.e. Opacus):
    dp: bool = setting(False, "DP-SGD: per-example clipping, Gaussian noise, Poisson sampling of each step's batch")
    dp_epsilon: float = setting(8.0, "target epsilon at --dp-delta over the planned steps (the noise is solved "
                                     "for it)", check="> 0")
    dp_noise_multiplier: float = setting(0.0, "noise std / clipping norm; 0 = solved from --dp-epsilon", check=">= 0")
    dp_delta: float = setting(1e-5, "delta of (epsilon, delta)-DP: 1e-5 for every task (a warning when not below "
                                    "1/n)", check="(0, 1)")
    dp_max_grad_norm: float = setting(1.0, "each example's gradient is clipped to this norm (C)", check="> 0")
    dp_accountant: str = setting("rdp", "rdp (Renyi DP) | prv (privacy random variables: tighter, slower)",
                                 choices=("rdp", "prv"))

    def __post_init__(self):
        super().__post_init__()
        check_device(self.device)
        check_tensorboard(self.tensorboard)
        if self.dp:
            if importlib.util.find_spec("opacus") is None:
                raise ConfigError("--dp needs Opacus, which is not installed; pip install 's3pet[dp]' (or opacus)")
            if self.grad_accum != 1:  # a Poisson batch is the logical batch: no accumulation over several
                raise ConfigError("--dp samples each step's batch whole; drop --grad-accum")
            if self.compile == "on":
                raise ConfigError("--dp runs eager (per-example gradients hook each module); use --compile off")
