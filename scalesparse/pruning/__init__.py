"""One-shot post-training pruning: statistics from calibration inputs, then masks and new weights.

Nothing here imports torch.distributed, DeepSpeed or Ray. Importing the package imports no torch
either (the `prune` driver may only check paths and hand the work to Ray workers); the registry and
its methods load on first use.
"""

__all__ = ["PRUNERS", "Pruner"]


def __getattr__(name: str):
    if name in __all__:
        from scalesparse.pruning import base, magnitude, sparsegpt, wanda  # noqa: F401  (registration)

        return getattr(base, name)
    raise AttributeError(f"module 'scalesparse.pruning' has no attribute {name!r}")
