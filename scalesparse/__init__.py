"""scalesparse: distributed training of sparse large models (DST, MoE, one-shot pruning)."""

__version__ = "0.1.0"
