"""Layer-level behaviour of the pruning methods against closed forms and each other."""

import pytest
import torch
from torch import nn

from scalesparse.pruning import PRUNERS
from scalesparse.pruning.base import weight_matrix

IN, OUT = 64, 48


def calibration(n=512, seed=0) -> torch.Tensor:
    """Correlated inputs with a few large-magnitude feature columns (as LLM activations have).
    One fixed distribution; `seed` draws the samples (calibration and held-out sets differ)."""
    fixed = torch.Generator().manual_seed(1234)
    mix = torch.eye(IN) + 0.5 * torch.randn(IN, IN, generator=fixed) / IN**0.5
    scale = torch.ones(IN)
    scale[torch.randperm(IN, generator=fixed)[:6]] = 8.0  # outlier features
    z = torch.randn(n, IN, generator=torch.Generator().manual_seed(seed))
    return (z @ mix) * scale


def layer(seed=1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=False)


def run(method, lin, x, sparsity, nm=None):
    p = PRUNERS.get(method)(lin)
    for chunk in x.split(128):
        p.add_batch(chunk)
    return p.prune(sparsity, nm)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_unstructured_sparsity_is_exact(method, sparsity):
    keep, w = run(method, layer(), calibration(), sparsity)
    assert int((~keep).sum()) == round(sparsity * OUT * IN)
    assert torch.all(w[~keep] == 0) and w.shape == (OUT, IN)
    if method == "wanda":  # compared within each output row
        assert torch.all((~keep).sum(1) == round(sparsity * IN))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_n_of_m_structure(method, nm):
    keep, w = run(method, layer(), calibration(), 0.5, nm)
    n, m = nm
    assert torch.all(keep.view(OUT, IN // m, m).sum(-1) == n)
    assert torch.all(w[~keep] == 0)


def test_quality_orders_as_in_the_literature():
    """Layer reconstruction error ‖(W − Ŵ) Xᵀ‖² on held-out inputs: SparseGPT < Wanda < magnitude."""
    x, held_out = calibration(seed=0), calibration(seed=5)
    lin = layer()
    w0 = lin.weight.detach()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        for nm in (None, (2, 4)):
            _, w = run(method, lin, x, 0.5, nm)
            errors[(method, nm)] = float(((w0 - w) @ held_out.t()).pow(2).sum())
    for nm in (None, (2, 4)):
        assert errors[("sparsegpt", nm)] < errors[("wanda", nm)] < errors[("magnitude", nm)], errors


def test_sparsegpt_at_zero_sparsity_leaves_the_weights_alone():
    lin = layer()
    keep, w = run("sparsegpt", lin, calibration(), 0.0)
    assert bool(keep.all())
    torch.testing.assert_close(w, lin.weight.detach(), rtol=0, atol=1e-6)


def test_sparsegpt_zeroes_weights_of_inputs_that_never_fire():
    x = calibration()
    x[:, 3] = 0.0
    keep, w = run("sparsegpt", layer(), x, 0.25)
    assert torch.all(w[:, 3] == 0)


def test_gpt2_conv1d_is_seen_as_out_by_in():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(OUT, IN)  # weight stored (in, out)
    torch.nn.init.normal_(conv.weight)
    assert weight_matrix(conv).shape == (OUT, IN)
    keep, w = run("wanda", conv, calibration(), 0.5)
    assert w.shape == (OUT, IN) and int((~keep).sum()) == OUT * IN // 2


def textbook_sparsegpt(w, xxt, n, sparsity, nm=None, blocksize=16, damp=0.01):
    """SparseGPT's Algorithm 1 written out column by column on W (out, in), with none of the solver's
    layout or fusion tricks: the reference the fast solver must match."""
    W = w.clone().double()
    H = 2.0 * xxt / n
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows, cols = W.shape
    mask = torch.zeros_like(W, dtype=torch.bool)
    done = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        E = torch.zeros(rows, i2 - i1, dtype=W.dtype)
        if nm is None:
            k = round(sparsity * rows * i2) - done
            done += k
            score = W[:, i1:i2] ** 2 / torch.diag(U)[i1:i2] ** 2
            block = torch.zeros(rows * (i2 - i1), dtype=torch.bool)
            block[torch.sort(score.flatten(), stable=True).indices[:k]] = True
            mask[:, i1:i2] = block.view(rows, i2 - i1)
        for j in range(i1, i2):
            if nm is not None and (j - i1) % nm[1] == 0:
                score = W[:, j : j + nm[1]] ** 2 / torch.diag(U)[j : j + nm[1]] ** 2
                for r in range(rows):
                    for c in torch.sort(score[r], stable=True).indices[: nm[1] - nm[0]]:
                        mask[r, j + c] = True
            e = torch.where(mask[:, j], W[:, j], torch.zeros(rows, dtype=W.dtype)) / U[j, j]
            for c in range(j, i2):
                W[:, c] -= e * U[j, c]
            W[:, j][mask[:, j]] = 0.0
            E[:, j - i1] = e
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return ~mask, W.float()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_solver_equals_the_textbook_algorithm(nm):
    x = calibration().double()
    lin = layer()
    p = PRUNERS.get("sparsegpt")(lin, blocksize=16)
    for chunk in x.float().split(128):
        p.add_batch(chunk)
    keep, w = p.prune(0.5, nm)
    ref_keep, ref_w = textbook_sparsegpt(lin.weight.detach(), x.t() @ x, x.shape[0], 0.5, nm)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-5)


def test_largest_per_row_keeps_what_a_stable_sort_keeps():
    """Wanda's per-row selection from k-th values equals a stable descending sort's first k, ties
    (many, from rounded scores), infinities and NaN included."""
    from scalesparse.pruning.base import largest_per_row

    g = torch.Generator().manual_seed(0)
    for t in range(60):
        rows, n = torch.randint(1, 12, (2,), generator=g).tolist()
        s = torch.randint(0, 4, (rows, n), generator=g).float() if t % 2 else torch.randn(rows, n, generator=g)
        if t % 5 == 0:
            s[:, 0] = float("inf")
        if t % 7 == 0:
            s[0, -1] = float("nan")
        for k in range(n + 1):
            idx = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
            want = torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)
            assert torch.equal(largest_per_row(s, k), want), (s, k)
