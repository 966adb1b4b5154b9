"""Export a structure with its weights: as an HF peft adapter, or merged into a plain model.

Both exports build their folder beside the target and rename it into place, check before
writing that the exported model reproduces s3pet's own model (backbone + DeltaSet) on a probe
batch, and write ``s3pet_export.json`` (format, structure, whether the weights were trained).
The task head is not part of the backbone: it is saved beside the model as ``head.safetensors``
(the state dict of ``TaskModel.head``, e.g. ``weight`` and ``bias`` of a linear read-out),
applied to the pooled features as in ``s3pet.heads.TaskModel``.

Each kind says how it exports (``s3pet.deltas.base.DeltaKind``: ``fold`` / ``merge_refusal``,
``peft_part`` / ``peft_refusal``); the lists below are what the shipped kinds say.

peft (``export_peft``): a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
that ``PeftModel.from_pretrained(base, folder)`` loads, ``base`` being the backbone as
``load_backbone`` builds it (``AutoModel``; ``AutoModelForSeq2SeqLM`` for T5); with a task
(``s3pet.export.task.export_task``, what ``export_run`` does for a retrain run) ``base`` is
``AutoModelForSequenceClassification`` and the head travels in ``modules_to_save``. What maps:

- ``lora`` on ``nn.Linear`` or GPT-2 ``Conv1D`` -> ``LoraConfig``: ``target_modules`` are the
  exact module paths (a fullmatch regex instead if a path is also a dotted suffix of another
  module), per-module ``rank_pattern`` / ``alpha_pattern`` so that peft's lora_alpha / r is
  s3pet's alpha / rank; ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r) keep their layout.
- ``bitfit`` on a linear -> the bias of LoRA's B (``lora_bias=True``, b_B = delta / scaling;
  peft >= 0.14), with a rank-1 LoRA of zero factors where the site has no LoRA; the base
  model's own biases are never changed, so ``disable_adapter()`` undoes BitFit too.
- ``lnfit``, and ``bitfit`` on a norm with a bias -> a trained copy of the norm with the deltas
  folded into its weight and bias: ``modules_to_save`` (peft matches these names by plain
  suffix, so LLaMA's final ``norm`` also wraps every ``*norm`` module with an unchanged copy),
  or ``LNTuningConfig`` when the structure has only norm modules.
- ``ia3`` -> ``IA3Config`` with ``feedforward_modules=[]`` (peft then scales the output, as
  s3pet does), ``ia3_l = 1 + scale``; only when nothing else in the structure needs LoRA
  (norm modules still go to ``modules_to_save``), since a peft adapter is one method.

- ``kronecker`` on ``nn.Linear`` -> ``LoKrConfig`` (``decompose_factor`` = its factor,
  ``decompose_both=False``, per-module ``rank_pattern`` / ``alpha_pattern``): ``lokr_w1`` and
  ``lokr_w2_a`` / ``lokr_w2_b`` as they are (their product as ``lokr_w2`` where peft keeps W2
  whole); only when nothing in the structure needs LoRA or IA3.
- ``sparse_lora`` without sparse chunks -> a LoRA layer, as ``lora``.

Not expressible in peft (StructureError naming kinds and sites, suggesting ``--merge`` when
merging works): ``adapter``, ``lowrank_adapter`` and ``parallel_adapter`` (bottlenecks: no
peft counterpart, no merge either); ``adapterbias`` (peft has none; it merges); ``ia3``,
``kronecker`` and LoRA-carried kinds together (one method per adapter); ``kronecker`` on GPT-2's
``Conv1D``; ``sparse_lora`` with sparse chunks (peft has no sparse residual); ``lora`` and
``sparse_lora`` at one linear; ``bitfit`` on a norm without a bias (RMSNorm);
``prefix`` (peft's PREFIX_TUNING is one prefix of one length on every layer, held as a key/value
cache that also shifts the input's positions, so no per-module, position-free prefix maps onto
it; no merge either: a prefix adds attention columns).

merged (``merge`` / ``export_merged``): the deltas folded into the weights of a plain
transformers model saved with ``save_pretrained`` (``AutoModel.from_pretrained`` loads it).
``lora``: W += (alpha/r) B A (transposed for ``Conv1D``); ``ia3``: rows of W and the bias
scaled by 1 + scale (before LoRA and BitFit add theirs, as in s3pet); ``bitfit``: into the
bias, creating one on an ``nn.Linear`` / ``nn.LayerNorm`` without one; ``lnfit``: into the
norm weight; ``adapterbias``: W += v (alpha^T W), b += v (alpha^T b), after the kinds of
earlier stages at its host (the output projection); ``kronecker``: W += (alpha/r) kron(W1, A B);
``sparse_lora``: W += (alpha/r) B A + S. A created bias survives ``from_pretrained`` only if the config builds it: config
switches such as LLaMA's ``attention_bias`` / ``mlp_bias`` are turned on (the other layers
they cover get zero biases); where no switch exists (T5), ``export_merged`` raises
StructureError instead of writing a model that would silently lose them. Bottleneck adapters
cannot be merged (StructureError).

``exportable_specs`` (``s3pet.export.exportable``) restricts a space's candidates to those
one of the two exports can always write (``SearchConfig.exportable``)."""

from s3pet.export.adapter import ADAPTER, PeftPlan, export_peft, plan_peft
from s3pet.export.folders import MARKER, read_export_info
from s3pet.export.merging import export_merged, merge, merge_problems
from s3pet.export.runs import FORMATS, export_run
from s3pet.export.weights import build_deltas

__all__ = ["ADAPTER", "FORMATS", "MARKER", "PeftPlan", "build_deltas", "export_merged", "export_peft",
           "export_run", "merge", "merge_problems", "plan_peft", "read_export_info"]
