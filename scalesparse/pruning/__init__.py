"""One-shot post-training pruning: statistics from calibration inputs, then masks and new weights.

Nothing here imports torch.distributed, DeepSpeed or Ray.
"""

from scalesparse.pruning import magnitude, sparsegpt, wanda  # noqa: F401  (registration)
from scalesparse.pruning.base import PRUNERS, Pruner

__all__ = ["PRUNERS", "Pruner"]
