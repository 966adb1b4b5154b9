"""Shared fixtures: tiny random backbones (built once per session), their sites, and inputs.

Tests get a fresh deep copy of a cached backbone, so hooks, frozen flags or edited weights
never leak from one test into another.
"""

from __future__ import annotations

import copy

import pytest
import torch

from s3pet.models import is_encoder_decoder, load_backbone
from s3pet.space import discover_sites


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models gain nothing from threads, and on a loaded CPU the threads only contend.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_backbone():
    """``tiny_backbone(alias) -> nn.Module``: a fresh copy (eval mode) of a cached tiny backbone."""
    cache: dict = {}

    def get(alias: str):
        if alias not in cache:
            cache[alias] = load_backbone(alias).eval()
        return copy.deepcopy(cache[alias])

    return get


@pytest.fixture(scope="session")
def tiny_sites(tiny_backbone):
    """``tiny_sites(alias) -> list[Site]``: the discovered sites of a tiny backbone (cached)."""
    cache: dict = {}

    def get(alias: str):
        if alias not in cache:
            cache[alias] = tuple(discover_sites(tiny_backbone(alias)))
        return list(cache[alias])

    return get


@pytest.fixture(scope="session")
def make_inputs():
    """``make_inputs(model, batch=2, seq=6, seed=0) -> dict``: keyword inputs for a forward pass.

    Token ids avoid the pad id 0; encoder-decoder models also get ``decoder_input_ids``.
    """

    def make(model, batch: int = 2, seq: int = 6, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 1000, (batch, seq), generator=g)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if is_encoder_decoder(model.config):
            kw["decoder_input_ids"] = torch.randint(1, 1000, (batch, max(1, seq // 2)), generator=g)
        return kw

    return make


@pytest.fixture(scope="session")
def backbone_output():
    """``backbone_output(model, inputs, grad=False) -> Tensor``: the first output (hidden states or logits)."""

    def run(model, inputs: dict, grad: bool = False):
        with torch.set_grad_enabled(grad):
            out = model(**inputs)
        return out[0]

    return run
