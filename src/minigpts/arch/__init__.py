"""Architecture adapters: `get_adapter(model)` says where each prunable group lives in that model."""

from __future__ import annotations

from typing import Any

from minigpts.arch.base import ArchAdapter
from minigpts.arch.gemma import GemmaAdapter
from minigpts.arch.gpt2 import GPT2Adapter
from minigpts.arch.gpt_neox import GPTNeoXAdapter
from minigpts.arch.llama import LlamaAdapter
from minigpts.arch.opt import OPTAdapter
from minigpts.arch.phi import PhiAdapter
from minigpts.arch.phi3 import Phi3Adapter
from minigpts.arch.stablelm import StableLmAdapter
from minigpts.errors import UserError

_ADAPTERS: tuple[ArchAdapter, ...] = (
    LlamaAdapter(),
    PhiAdapter(),
    OPTAdapter(),
    Phi3Adapter(),
    GemmaAdapter(),
    GPTNeoXAdapter(),
    StableLmAdapter(),
    GPT2Adapter(),
)

SUPPORTED_FAMILIES: dict[str, tuple[str, ...]] = {
    adapter.family: tuple(adapter.class_prefixes) for adapter in _ADAPTERS
}  # family -> the config.model_type values it covers


def get_adapter(model_or_config: Any) -> ArchAdapter:
    """The adapter for a model (or its config), chosen by `config.model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in _ADAPTERS:
        if model_type in adapter.class_prefixes:
            return adapter
    supported = "; ".join(f"{family} ({', '.join(types)})" for family, types in SUPPORTED_FAMILIES.items())
    raise UserError(f"model type {model_type!r} is not supported; supported families: {supported}")


__all__ = ["ArchAdapter", "SUPPORTED_FAMILIES", "get_adapter"]
