"""A run's metrics over steps: ``history.jsonl`` and, optionally, TensorBoard (``<run>/tb/``).

One writer for both, so TensorBoard shows exactly the numbers of ``history.jsonl``: every
numeric field of a record becomes the scalar ``<group>/<field>`` at the record's step (group
``train`` or ``search``; ``eval/<metric>`` for the validation metrics, ``<group>/<field>/<key>``
for other nested numbers); strings and the step and epoch counters are not plotted. Only rank 0 writes (``s3pet.io``).
"""

from __future__ import annotations

import math
from pathlib import Path

from s3pet import dist
from s3pet.configs.base import check_tensorboard  # noqa: F401  (re-exported: the one owner is the configs)
from s3pet.io import append_jsonl

TB_DIR = "tb"


def scalars(record: dict, group: str) -> dict[str, float]:
    """The TensorBoard scalars of one history record: ``{tag: value}``, finite numbers only."""
    out = {}
    for key, v in record.items():
        if key in ("step", "epoch"):
            continue
        if isinstance(v, dict):  # validation metrics; per-kind counts
            prefix = "eval" if key == "eval" else f"{group}/{key}"
            out.update({f"{prefix}/{k}": float(x) for k, x in v.items() if _finite(x)})
        elif _finite(v):
            out[f"{group}/{key}"] = float(v)
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class History:
    """Appends records to ``run_dir/history.jsonl`` and mirrors them to TensorBoard when asked.

    Args:
        run_dir: the run folder; None writes nothing (a run without a folder).
        group: tag prefix of the training scalars ("train" or "search").
        tensorboard: also write ``run_dir/tb/`` with ``torch.utils.tensorboard``.
        start_step: a resumed run: TensorBoard events after this step are dropped, as
            history lines after the checkpoint are.
    """

    def __init__(self, run_dir: str | Path | None, group: str = "train", tensorboard: bool = False,
                 start_step: int | None = None):
        self.path = Path(run_dir) / "history.jsonl" if run_dir is not None and dist.is_main() else None
        self.group = group
        self._tb = None
        if self.path is not None and tensorboard:
            check_tensorboard(True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / TB_DIR), purge_step=start_step)

    def write(self, record: dict) -> None:
        """Append one record (it must hold "step" for TensorBoard)."""
        if self.path is None:
            return
        append_jsonl(self.path, record)
        if self._tb is not None:
            step = int(record.get("step", 0))
            for tag, v in scalars(record, self.group).items():
                self._tb.add_scalar(tag, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
