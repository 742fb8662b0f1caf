"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): a dense checkpoint loaded into the
MoE model (`model.mlp: moe` on a dense family) becomes E experts per layer, each an exact copy of
that layer's MLP.

Router initialisation: not in the checkpoint, so drawn: normal(0, model.init_std) from a generator
derived from the run's seed and the router's name, the same on every rank and however the model is
partitioned (Komatsuzaki et al. also start the router at random).
Any router gives the dense function at step 0: every expert computes the dense MLP's f(x), and the
k gate weights are renormalised to sum to 1 (moe.renormalize: true), so Σ_k g_k f(x) = f(x). The
router's random logits break the experts' symmetry once training moves them apart.
"""

from __future__ import annotations

import torch

from scalesparse.model.families.base import LAYER, Family


class Upcycled(Family):
    """A dense family's tensors read into (and, for checking, written from) our stacked experts."""

    def __init__(self, dense: Family, num_experts: int) -> None:
        self.dense, self.num_experts = dense, num_experts
        self.model_type, self.architecture = dense.model_type, dense.architecture

    @staticmethod
    def _mlp(name: str) -> tuple[str, str] | None:
        """(layer index, our tensor's last part) for a layer's experts or router, else None."""
        match = LAYER.match(name)
        if match and match.group(2).startswith(("mlp.experts.", "mlp.router.")):
            return match.group(1), match.group(2)
        return None

    def hf_names(self, name: str, shape: tuple[int, ...]) -> list[str]:
        part = self._mlp(name)
        if part is None:
            return self.dense.hf_names(name, shape)
        layer, what = part
        if what.startswith("mlp.router."):
            return []  # the router is new: load_pretrained draws it (router_init)
        dense = ("gate_proj", "up_proj") if what.endswith("gate_up_proj") else ("down_proj",)
        return [n for d in dense for n in self.dense.hf_names(f"layers.{layer}.mlp.{d}.weight", shape[1:])]

    def flat_names(self, name: str, shape: tuple[int, ...]) -> list[str]:
        names = self.hf_names(name, shape)
        return names * self.num_experts if self._mlp(name) is not None else self.dense.flat_names(name, shape)

    def from_hf(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self._mlp(name) is None:
            return self.dense.from_hf(name, tensors)
        one = torch.cat(tensors)  # [gate; up] (ff·2, d), the experts' layout; or down (d, ff)
        return one.unsqueeze(0).expand(self.num_experts, *one.shape).clone()

    def to_hf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The dense tensors expert 0 comes from (what loading reads; the router reads nothing)."""
        names = self.hf_names(name, tuple(tensor.shape))
        if self._mlp(name) is None:
            return self.dense.to_hf(name, tensor)
        return dict(zip(names, tensor[0].chunk(len(names)), strict=True)) if names else {}


def router_init(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """An upcycled router's starting weights: normal(0, std) from (seed, name), whole (routers are small)."""
    from scalesparse.sparsity.base import derived_generator

    return torch.randn(shape, generator=derived_generator(seed, -2, name)) * std
