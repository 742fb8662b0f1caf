"""RigL (Evci et al., 2020): drop the smallest-magnitude weights, grow where |dense gradient| is largest."""

import torch

from scalesparse.sparsity.base import SPARSIFIERS, DropAndGrow, LayerView


@SPARSIFIERS.register("rigl")
class RigL(DropAndGrow):
    dense_gradient_every_update = True

    def grow_scores(self, step: int, v: LayerView) -> torch.Tensor:
        if v.grad is None:
            raise RuntimeError(f"rigl needs the dense gradient of {v.name} at step {step}")
        return v.grad.abs()
