"""SET (Mocanu et al., 2018): drop the smallest-magnitude weights, grow at random."""

import torch

from scalesparse.sparsity.base import SPARSIFIERS, DropAndGrow, LayerView, derived_generator


@SPARSIFIERS.register("set")
class SET(DropAndGrow):
    def grow_scores(self, step: int, v: LayerView) -> torch.Tensor:
        # one draw for the whole tensor from (seed, step, layer), sliced: every rank sees the same numbers
        full = torch.rand(v.shape[0] * v.shape[1], generator=derived_generator(self.seed, step, v.name))
        return full[v.start : v.stop].to(v.weight.device)
