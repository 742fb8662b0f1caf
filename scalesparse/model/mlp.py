"""Pluggable MLP blocks, registered by name; `model.mlp` in YAML picks one.

A builder takes (model config, moe config); `moe` lives in scalesparse.model.moe.layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalesparse.config import ModelConfig, MoEConfig
from scalesparse.model.layers import MaskedLinear
from scalesparse.registry import Registry

MLPS: Registry[type[nn.Module]] = Registry("mlp")


@MLPS.register("dense")
class DenseMLP(nn.Module):
    """GELU MLP (up → gelu → down) or SwiGLU (down(silu(gate) ⊙ up)), Llama's names."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None = None) -> None:
        super().__init__()
        hidden = cfg.hidden_ff
        self.swiglu = cfg.activation == "swiglu"
        if self.swiglu:
            self.gate_proj = MaskedLinear(cfg.d_model, hidden, bias=cfg.bias)
        self.up_proj = MaskedLinear(cfg.d_model, hidden, bias=cfg.bias)
        self.down_proj = MaskedLinear(hidden, cfg.d_model, bias=cfg.bias)
        self.down_proj.residual_out = True  # scaled init, see GPT._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))
