"""Mixtral: Mistral's attention with a sparse MoE MLP, mapped into scalesparse's MoE layer.

transformers' files keep each expert as three matrices under `block_sparse_moe`:
w1 (gate, (ff, d)), w3 (up, (ff, d)), w2 (down, (d, ff)); ours stack all experts:
gate_up_proj (E, 2·ff, d) = [w1; w3] per expert, down_proj (E, d, ff) = w2 per expert. The router
is the same (E, d) matrix; both route softmax → top-k → renormalise over the k.
"""

from __future__ import annotations

from typing import Any

import torch

from scalesparse.config import ModelConfig, MoEConfig
from scalesparse.model.families.base import LAYER, HFConfig
from scalesparse.model.families.mistral import Mistral
from scalesparse.model.families.registry import FAMILIES


@FAMILIES.register("mixtral")
class Mixtral(Mistral):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    default_rope_theta = 1e6
    default_rms_eps = 1e-5

    def model_fields(self, hf: HFConfig, where: str) -> dict[str, Any]:
        return {**super().model_fields(hf, where), "mlp": "moe"}

    def moe_fields(self, hf: HFConfig) -> dict[str, Any]:
        return {"num_experts": hf.get("num_local_experts", 8), "top_k": hf.get("num_experts_per_tok", 2),
                "d_ff": hf["intermediate_size"], "renormalize": True}  # fmt: skip

    def extra_hf_config(self, m: ModelConfig, moe: MoEConfig | None) -> HFConfig:
        moe = moe or MoEConfig()
        return {**super().extra_hf_config(m, moe), "num_local_experts": moe.num_experts,
                "num_experts_per_tok": moe.top_k, "intermediate_size": moe.d_ff or m.hidden_ff}  # fmt: skip

    @staticmethod
    def _experts(name: str) -> str | None:
        """transformers' prefix of a layer's experts when `name` is one of our stacked expert tensors."""
        match = LAYER.match(name)
        if match and match.group(2).startswith("mlp.experts."):
            return f"model.layers.{match.group(1)}.block_sparse_moe.experts"
        return None

    def hf_names(self, name: str, shape: tuple[int, ...]) -> list[str]:
        match = LAYER.match(name)
        if match and match.group(2) == "mlp.router.gate.weight":
            return [f"model.layers.{match.group(1)}.block_sparse_moe.gate.weight"]
        prefix = self._experts(name)
        if prefix is None:
            return super().hf_names(name, shape)
        parts = ("w1", "w3") if name.endswith("gate_up_proj") else ("w2",)
        return [f"{prefix}.{e}.{w}.weight" for e in range(shape[0]) for w in parts]  # shape[0]: E

    def from_hf(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self._experts(name) is None:
            return super().from_hf(name, tensors)
        if name.endswith("gate_up_proj"):  # [w1_0, w3_0, w1_1, w3_1, …] → (E, 2·ff, d)
            return torch.stack([torch.cat(tensors[i : i + 2]) for i in range(0, len(tensors), 2)])
        return torch.stack(tensors)  # [w2_0, w2_1, …] → (E, d, ff)

    def to_hf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._experts(name) is None:
            return super().to_hf(name, tensor)
        names = self.hf_names(name, tuple(tensor.shape))
        if name.endswith("gate_up_proj"):
            pieces = [half for e in tensor for half in e.chunk(2)]  # w1_e, w3_e per expert
        else:
            pieces = list(tensor)
        return {n: p.contiguous() for n, p in zip(names, pieces, strict=True)}
