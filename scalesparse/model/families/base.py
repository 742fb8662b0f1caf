"""What every family adapter does, written once for the Llama layout that all four families share.

An adapter translates in three places and nowhere else: a transformers `config.json` ↔ our
ModelConfig (+ MoEConfig), a transformers tensor name ↔ ours, and a transformers tensor ↔ ours
(Mixtral's per-expert matrices ↔ our stacked experts). The model code never sees a transformers name.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from scalesparse.config import ModelConfig, MoEConfig
from scalesparse.errors import ConfigError

HFConfig = dict[str, Any]


def rope_fields(hf: HFConfig, where: str) -> dict[str, Any]:
    """RoPE settings from either config layout: transformers 5's `rope_parameters` or 4's
    `rope_theta` + `rope_scaling`. A missing theta is the family's default, never silently ours."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta"))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta) if theta is not None else None}
    if kind == "default":
        out["rope_scaling"] = "none"
    elif kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(scaling["factor"]))
    elif kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(scaling["factor"]),
                   rope_low_freq_factor=float(scaling["low_freq_factor"]),
                   rope_high_freq_factor=float(scaling["high_freq_factor"]),
                   rope_original_max_len=int(scaling["original_max_position_embeddings"]))  # fmt: skip
    else:
        raise ConfigError(f"{where}: rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
    return out


def rope_to_hf(m: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": m.rope_theta, "rope_type": "default"}
    if m.rope_scaling == "linear":
        params.update(rope_type="linear", factor=m.rope_factor)
    elif m.rope_scaling == "llama3":
        params.update(rope_type="llama3", factor=m.rope_factor, low_freq_factor=m.rope_low_freq_factor,
                      high_freq_factor=m.rope_high_freq_factor,
                      original_max_position_embeddings=m.rope_original_max_len)  # fmt: skip
    return params


LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


class Family:
    """The Llama layout: model.layers.N.{self_attn,mlp}.*, model.norm, model.embed_tokens, lm_head.
    Our names are the same without the "model." prefix, so most tensors map one to one."""

    model_type = ""
    architecture = ""
    default_rope_theta = 10000.0
    default_rms_eps = 1e-6
    default_tie = False

    # ------------------------------------------------------------------ config
    def model_fields(self, hf: HFConfig, where: str) -> dict[str, Any]:
        """ModelConfig fields that the checkpoint fixes (architecture and shapes)."""
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (SwiGLU needs silu)")
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or d // heads
        rope = rope_fields(hf, where)
        if rope["rope_theta"] is None:
            rope["rope_theta"] = self.default_rope_theta
        return {
            "d_model": d, "n_layers": hf["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": hf.get("num_key_value_heads") or heads,
            "head_dim": None if head_dim * heads == d else head_dim,
            "d_ff": hf["intermediate_size"], "activation": "swiglu", "norm": "rmsnorm",
            "norm_eps": float(hf.get("rms_norm_eps", self.default_rms_eps)), "position": "rotary",
            "tie_embeddings": bool(hf.get("tie_word_embeddings", self.default_tie)),
            "max_positions": hf.get("max_position_embeddings"), "vocab_size": hf["vocab_size"],
            "mlp": "dense", **self.bias_fields(hf, where), **self.window_fields(hf, where), **rope,
        }  # fmt: skip

    def bias_fields(self, hf: HFConfig, where: str) -> dict[str, Any]:
        attn, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn != mlp:
            raise ConfigError(f"{where}: attention_bias={attn} with mlp_bias={mlp} is not supported (both or neither)")
        return {"bias": attn, "qkv_bias": False}

    def window_fields(self, hf: HFConfig, where: str) -> dict[str, Any]:
        return {"sliding_window": None}

    def moe_fields(self, hf: HFConfig) -> dict[str, Any] | None:
        """MoEConfig fields the checkpoint fixes; None for a dense family."""
        return None

    def hf_config(self, m: ModelConfig, moe: MoEConfig | None, original: HFConfig | None) -> HFConfig:
        """config.json for a model of this family: the original's keys, with what we know overwritten."""
        out = dict(original or {})
        for legacy in ("rope_theta", "rope_scaling"):  # one RoPE source of truth: rope_parameters
            out.pop(legacy, None)
        out.update({
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.hidden_ff,
            "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
            "head_dim": m.attn_head_dim, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
            "max_position_embeddings": m.max_positions or m.seq_len, "tie_word_embeddings": m.tie_embeddings,
            "rope_parameters": rope_to_hf(m), "dtype": "float32",
        })  # fmt: skip
        out.pop("torch_dtype", None)
        out.update(self.extra_hf_config(m, moe))
        return out

    def extra_hf_config(self, m: ModelConfig, moe: MoEConfig | None) -> HFConfig:
        return {"attention_bias": m.bias, "mlp_bias": m.bias}

    # ------------------------------------------------------------------ tensors
    def hf_names(self, name: str, shape: tuple[int, ...]) -> list[str]:
        """The transformers tensors our parameter `name` (of `shape`) is made from, in from_hf's order."""
        return [name if name.startswith("lm_head") else f"model.{name}"]

    def flat_names(self, name: str, shape: tuple[int, ...]) -> list[str]:
        """The transformers tensors whose flattened values, laid end to end, are our parameter flattened:
        what lets a ZeRO-3 rank read only its partition. Every family's from_hf concatenates or stacks
        without reordering, so these are hf_names (a family that permuted would say otherwise)."""
        return self.hf_names(name, shape)

    def from_hf(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        (t,) = tensors
        return t

    def to_hf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        (hf_name,) = self.hf_names(name, tuple(tensor.shape))
        return {hf_name: tensor}
