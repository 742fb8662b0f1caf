"""Perplexity with a sliding window: each window sees up to `window` tokens of context and scores
only the tokens no earlier window scored (stride ≤ window), so every token is predicted once."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int, stride: int) -> dict:
    """ids: 1-D token ids of the evaluation text."""
    nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        x = ids[begin:end].unsqueeze(0)
        logits = model(x).logits[0, :-1].float()  # position t predicts token t + 1
        k = min(end - prev_end, x.shape[1] - 1)  # the new tokens of this window
        nll += float(F.cross_entropy(logits[-k:], x[0, 1:][-k:], reduction="sum"))
        scored += k
        prev_end = end
        if end == ids.numel():
            break
    return {"ppl": math.exp(nll / scored), "nll": nll / scored, "tokens_scored": scored, "window": window,
            "stride": stride}  # fmt: skip
