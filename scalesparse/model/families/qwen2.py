"""Qwen2: Llama's layout with bias on the q/k/v projections (not on o_proj nor the MLP)."""

from typing import Any

from scalesparse.config import ModelConfig, MoEConfig
from scalesparse.errors import ConfigError
from scalesparse.model.families.base import Family, HFConfig
from scalesparse.model.families.registry import FAMILIES


@FAMILIES.register("qwen2")
class Qwen2(Family):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"

    def bias_fields(self, hf: HFConfig, where: str) -> dict[str, Any]:
        return {"bias": False, "qkv_bias": True}

    def window_fields(self, hf: HFConfig, where: str) -> dict[str, Any]:
        # Qwen2 windows only some layers (from max_window_layers on); one window for all is not that
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=true (per-layer windows) is not supported for qwen2")
        return {"sliding_window": None}

    def extra_hf_config(self, m: ModelConfig, moe: MoEConfig | None) -> HFConfig:
        return {"use_sliding_window": False}
