"""Weight sparsity: masks, layer densities and the algorithms that evolve them (one per module).

Nothing here imports torch.distributed, DeepSpeed or Ray: global decisions go through
scalesparse.comm, and the trainer hands algorithms plain tensor slices (LayerView).
"""

from scalesparse.sparsity import gmp, rigl, set, snip, static  # noqa: F401  (registration)
from scalesparse.sparsity.base import SPARSIFIERS, LayerView, Position, Sparsifier

__all__ = ["SPARSIFIERS", "LayerView", "Position", "Sparsifier"]
