"""Static sparse training: a random mask with the configured per-layer density, fixed for the run."""

from scalesparse.sparsity.base import SPARSIFIERS, Position, Sparsifier


@SPARSIFIERS.register("static")
class Static(Sparsifier):
    position = Position("before training", "sparse-to-sparse", "static")
