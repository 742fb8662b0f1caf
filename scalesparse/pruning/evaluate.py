"""Perplexity with a sliding window: each window sees up to `window` tokens of context and scores
only the tokens no earlier window scored (stride ≤ window), so every token is predicted once."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def evaluation_device(model, device: str, budget: float = 0.8) -> str:
    """Where to evaluate: `device` when the whole model fits in `budget` of its free memory (a
    model larger than the GPU is pruned block by block, but evaluated on the CPU)."""
    if not str(device).startswith("cuda"):
        return "cpu"
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return device if need <= budget * free else "cpu"


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int, stride: int, device: str = "cpu") -> dict:
    """ids: 1-D token ids of the evaluation text. The model visits `device` for the evaluation and
    goes back to where it was."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        return _perplexity(model, ids.to(device), window, stride)
    finally:
        model.to(home)


def _perplexity(model, ids: torch.Tensor, window: int, stride: int) -> dict:
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
