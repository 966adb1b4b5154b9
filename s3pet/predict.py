"""Predictions of a finished run on new text (``s3pet predict``, ``s3pet.load_run(DIR).predict``).

The run is rebuilt by ``pipeline.load_run`` (what ``s3pet evaluate`` uses) and the inputs go
through evaluation's own tokenisation and forward (``data.encode``, ``train.batch_logits``),
so a row's label is exactly the one evaluation scores for it. One record per input row, in
order:

- ``label``: the predicted label's name (the card's ``labels``; for multiple choice the choice
  slot, e.g. ``choice1``), the argmax of the logits;
- ``label_id``: its index in the card's ``labels``;
- ``scores``: the softmax probability of every label, in the card's order (``scores[label_id]``
  is the predicted label's); text-to-text models (T5) are scored over the label words' first
  tokens only, the logits their evaluation compares.

For a regression task ``label`` and ``label_id`` are null and ``scores`` is the predicted value
(a number on the scale of the training labels, e.g. STS-B's 0-5).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from s3pet import data as D
from s3pet.errors import ConfigError
from s3pet.heads import TaskModel
from s3pet.io import atomic_write_text
from s3pet.pipeline import LoadedRun, load_run, read_run_config, run_max_length
from s3pet.tasks import Example, get_card, input_examples, read_inputs
from s3pet.train import batch_logits, resolve_device


class Predictor:
    """A loaded run that predicts labels for new inputs (what ``s3pet.load_run`` returns).

    Attributes: ``run`` (the ``LoadedRun``: task model, card, tokenizer, config, device),
    ``card`` and ``model`` (the ``TaskModel``, in eval mode)."""

    def __init__(self, run: LoadedRun):
        self.run = run
        self.card = run.card
        self.model = run.model

    def __repr__(self) -> str:
        return f"Predictor({self.run.path}, task {self.card.name}, {self.run.config['model']} on {self.run.device})"

    def predict(self, inputs: Iterable[dict | str], batch_size: int | None = None) -> list[dict]:
        """Records ``{label, label_id, scores}`` (see the module docstring) for each input, in order.

        Args:
            inputs: dicts of the card's input fields (``s3pet.tasks.input_fields``), or plain strings
                for a task with one text field.
            batch_size: rows per forward pass (default: the run's ``eval_batch_size``).
        Raises:
            TaskError: an input without a field the card needs; ConfigError: a bad batch size."""
        return self.predict_examples(input_examples(self.card, ((f"inputs[{i}]", r) for i, r in enumerate(inputs))),
                                     batch_size)

    def predict_examples(self, examples: list[Example], batch_size: int | None = None) -> list[dict]:
        """Records for ``Example``s (their labels are ignored), in order."""
        cfg, tok = self.run.train, self.run.tokenizer
        batch_size = _check_batch_size(batch_size) or cfg.eval_batch_size
        split = D.encode(examples, tok, run_max_length(self.run), self.card.is_regression)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0  # as train.encode_task pads
        out: list[dict] = []
        for logits, _ in batch_logits(self.model, split, pad, batch_size, self.run.device, cfg.precision):
            out += records(logits, self.card)
        return out


def records(logits: torch.Tensor, card) -> list[dict]:
    """One ``{label, label_id, scores}`` record per row of a batch's logits."""
    if card.is_regression:
        return [{"label": None, "label_id": None, "scores": v} for v in logits.float().cpu().tolist()]
    ids = TaskModel.predict(logits, False).cpu().tolist()  # evaluation's argmax, not the softmax's
    probs = torch.softmax(logits.float(), -1).cpu().tolist()
    return [{"label": card.labels[i], "label_id": i, "scores": p} for i, p in zip(ids, probs)]


def predict_file(run: str | os.PathLike, input: str | os.PathLike, out: str | os.PathLike,
                 batch_size: int | None = None, device: str | None = None) -> int:
    """Predict every row of ``input`` (CSV/TSV with a header, or JSON lines, holding the run's task
    input fields) and write one JSON line per row, in order, to ``out`` (atomically). Returns the rows.

    ``run``: a retrain or baseline run, or the main job's folder (its ``retrain/``). ``device``
    overrides the run's own (``auto``, ``cpu``, ``cuda:N``). Everything is checked before the model
    loads, and ``out`` is written only when every row is predicted.
    Raises ConfigError (run, out, batch size) or TaskError (input file, a missing field)."""
    src, dst = Path(input), Path(out)
    _check_batch_size(batch_size)
    if device is not None:
        resolve_device(device)  # a device that is not there: one line now, not after loading the model
    if dst.is_dir():
        raise ConfigError(f"--out {dst} is a folder; give the file to write, e.g. {dst / 'predictions.jsonl'}")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ConfigError(f"--out {dst} is the input file; write the predictions elsewhere")
    parent = dst.parent if str(dst.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {dst}: cannot write into {parent}")
    _, config, _ = read_run_config(run)
    examples = read_inputs(get_card(config["task"]), src)  # bad input fails before the model loads
    preds = Predictor(load_run(run, device=device)).predict_examples(examples, batch_size)
    try:
        atomic_write_text(dst, "".join(json.dumps(r) + "\n" for r in preds))
    except OSError as e:
        raise ConfigError(f"--out {dst}: cannot write ({e.strerror})") from e
    return len(preds)


def _check_batch_size(batch_size) -> int | None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size (--batch-size) must be a positive integer, got {batch_size!r}")
    return batch_size
