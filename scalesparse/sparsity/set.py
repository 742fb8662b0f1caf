"""SET (Mocanu et al., 2018): drop the smallest-magnitude weights, grow at random."""

import torch

from scalesparse.sparsity.base import SPARSIFIERS, DropAndGrow, LayerView, derived_generator


@SPARSIFIERS.register("set")
class SET(DropAndGrow):
    def grow_scores(self, step: int, v: LayerView) -> torch.Tensor:
        # one draw for the whole tensor from (seed, step, layer), sliced: every rank sees the same numbers;
        # drawn where the weights are: on a GPU, whole layers drawn on the CPU and copied over would put
        # host work proportional to the model into every update
        dev = v.weight.device
        g = derived_generator(self.seed, step, v.name, dev)
        full = torch.rand(v.shape[0] * v.shape[1], generator=g, device=dev)
        return full[v.start : v.stop]
