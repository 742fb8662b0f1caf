"""Mistral: Llama's layout with a sliding attention window and an explicit head_dim."""

from typing import Any

from scalesparse.config import ModelConfig, MoEConfig
from scalesparse.model.families.base import Family, HFConfig
from scalesparse.model.families.registry import FAMILIES


@FAMILIES.register("mistral")
class Mistral(Family):
    model_type = "mistral"
    architecture = "MistralForCausalLM"

    def bias_fields(self, hf: HFConfig, where: str) -> dict[str, Any]:
        return {"bias": False, "qkv_bias": False}  # Mistral's projections carry no bias

    def window_fields(self, hf: HFConfig, where: str) -> dict[str, Any]:
        return {"sliding_window": hf.get("sliding_window")}

    def extra_hf_config(self, m: ModelConfig, moe: MoEConfig | None) -> HFConfig:
        return {"sliding_window": m.sliding_window}
