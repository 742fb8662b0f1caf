"""MoE exactness: grouped == per-expert loop == transformers' Mixtral block, outputs and gradients."""

import functools
import math

import pytest
import torch

from scalesparse.config import ModelConfig, MoEConfig, config_from_dict
from scalesparse.errors import ConfigError
from scalesparse.model import GPT, active_params, count_flops_per_token
from scalesparse.model.moe import backends
from scalesparse.model.moe.backends import BACKENDS, megablocks_available, resolve_backend
from scalesparse.model.moe.layer import MoEMLP, capacity_assignment
from scalesparse.model.moe.router import Routing, TopKRouter, load_balancing_loss

D, FF, E, K = 32, 48, 8, 2


def make_layer(backend="grouped", activation="swiglu", **moe) -> MoEMLP:
    torch.manual_seed(0)
    layer = MoEMLP(ModelConfig(d_model=D, d_ff=FF, activation=activation), MoEConfig(num_experts=E, top_k=K,
                   backend=backend, **moe))  # fmt: skip
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


def run(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # a loss that weights every output
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


def assert_same(a, b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    torch.testing.assert_close(a[1], b[1], rtol=tol, atol=tol)
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_equals_the_per_expert_loop(activation):
    x = torch.randn(2, 37, D)
    grouped, loop = make_layer("grouped", activation), make_layer("loop", activation)
    loop.load_state_dict(grouped.state_dict())
    assert_same(run(grouped, x), run(loop, x))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_in_row_blocks_equals_the_per_expert_loop(activation, monkeypatch):
    """On CPU the grouped MLP runs each expert's rows in cache-sized blocks; with 5-row blocks every
    expert spans several, so weight gradients are accumulated across blocks."""
    monkeypatch.setattr(backends, "block_rows", lambda gate_up: 5)
    x = torch.randn(3, 41, D)
    grouped, loop = make_layer("grouped", activation), make_layer("loop", activation)
    loop.load_state_dict(grouped.state_dict())
    out = run(grouped, x)
    assert grouped.stats["load"].min() > 10  # several blocks per expert
    assert_same(out, run(loop, x))


def test_grouped_with_frozen_experts_gives_the_loops_input_and_router_gradients():
    x = torch.randn(2, 37, D)
    grouped, loop = make_layer("grouped"), make_layer("loop")
    loop.load_state_dict(grouped.state_dict())
    grads = []
    for layer in (grouped, loop):
        layer.experts.requires_grad_(False)
        xi = x.clone().requires_grad_(True)
        layer(xi).pow(2).sum().backward()
        assert layer.experts.gate_up_proj.grad is None
        grads.append((xi.grad, layer.router.gate.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_handles_experts_without_tokens():
    layer = make_layer()
    with torch.no_grad():
        layer.router.gate.weight[3:] = -100.0  # with positive inputs, experts 3..7 get no token
    ref = make_layer("loop")
    ref.load_state_dict(layer.state_dict())
    x = torch.rand(5, D) + 0.1
    out = run(layer, x)
    assert layer.stats["load"][3:].sum() == 0
    assert torch.all(out[2]["experts.gate_up_proj"][3:] == 0)
    assert_same(out, run(ref, x))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_mm_path_equals_the_per_expert_loop(activation, monkeypatch):
    """The CUDA fast path (torch._grouped_mm, device-side offsets, gather un-permute, batched weighting)
    run here on torch's CPU grouped GEMM: outputs and every gradient equal the loop's."""
    monkeypatch.setattr(backends, "grouped_mm_applies", lambda x, ex: True)
    x = torch.rand(2, 37, D) + 0.1
    fast, loop = make_layer("grouped", activation), make_layer("loop", activation)
    with torch.no_grad():
        fast.router.gate.weight[5:] = -1.0  # with positive inputs experts 5..7 get no token: empty groups
    loop.load_state_dict(fast.state_dict())
    out = run(fast, x)
    assert fast.stats["load"][5:].sum() == 0 and fast.stats["load"].sum() == 2 * 37 * K
    assert torch.all(out[2]["experts.gate_up_proj"][5:] == 0)
    assert_same(out, run(loop, x))


def test_sorted_assignments_offsets_match_bincount():
    experts = torch.randint(0, E, (50, K))
    experts[experts == 3] = 4  # an empty group
    order, offsets = backends.sorted_assignments(experts, E)
    assert offsets.dtype == torch.int32
    assert offsets.tolist() == torch.cumsum(torch.bincount(experts.reshape(-1), minlength=E), 0).tolist()
    assert torch.equal(order, torch.argsort(experts.reshape(-1), stable=True))


class MegaBlocksReferenceOps:
    """MegaBlocks' routing ops as their kernels define them (megablocks/ops, backend/kernels.py), in
    plain differentiable torch, so the composition in backends.megablocks_moe is checked on CPU; the
    CUDA kernels themselves are the gpu test's business."""

    @staticmethod
    def sort(x, end_bit):  # CUB radix sort of the low end_bit bits: stable
        values, indices = torch.sort(x, stable=True)
        return values, indices.int()

    @staticmethod
    def histogram(x, max_val):
        return torch.bincount(x, minlength=max_val).int()

    @staticmethod
    def inclusive_cumsum(x, dim):
        return torch.cumsum(x, dim).int()

    @staticmethod
    def gather(x, indices, bin_ids, bins, top_k):  # row i of the output: x[indices[i] // top_k]
        return x.index_select(0, indices.long() // top_k)

    @staticmethod
    def scatter(x, indices, bin_ids, weights, bins, top_k):  # row i goes to assignment indices[i], scaled
        idx = indices.long()
        rows = torch.zeros_like(x).index_copy(0, idx, x * weights[idx].unsqueeze(1))
        return rows.view(-1, top_k, x.shape[1]).sum(1)


def reference_gmm(a, b, batch_sizes, trans_b=False):
    assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.long  # what grouped_gemm demands
    outs, start = [], 0
    for e, n in enumerate(batch_sizes.tolist()):
        outs.append(a[start : start + n] @ (b[e].t() if trans_b else b[e]))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_megablocks_composition_equals_the_per_expert_loop(activation):
    """fp32: MegaBlocks' routing around one GEMM per expert (grouped_gemm is bf16-only)."""
    layer, loop = make_layer("grouped", activation), make_layer("loop", activation)
    loop.load_state_dict(layer.state_dict())
    layer.backend = lambda x, w, e, ex: backends.megablocks_moe(x, w, e, ex, MegaBlocksReferenceOps,
                                                                backends.megablocks_expert_mlp)  # fmt: skip
    x = torch.randn(2, 37, D)
    assert_same(run(layer, x), run(loop, x))


def test_megablocks_composition_in_bf16_runs_the_grouped_gemm():
    """bf16: the gathered rows go through grouped_gemm's gmm (a reference here), checked against
    the loop in bf16 within bf16 tolerance."""
    calls = []

    def gmm(a, b, batch_sizes, trans_b=False):
        calls.append(a.dtype)
        return reference_gmm(a, b, batch_sizes, trans_b)

    mlp = functools.partial(backends.megablocks_expert_mlp, gmm=gmm)
    layer, loop = make_layer("grouped"), make_layer("loop")
    loop.load_state_dict(layer.state_dict())
    layer, loop = layer.to(torch.bfloat16), loop.to(torch.bfloat16)
    layer.backend = lambda x, w, e, ex: backends.megablocks_moe(x, w, e, ex, MegaBlocksReferenceOps, mlp)
    x = torch.randn(64, D, dtype=torch.bfloat16)
    assert_close_rel(run(layer, x), run(loop, x), rel=2e-2)
    assert calls == [torch.bfloat16] * 2  # the two expert GEMMs ran through gmm


def test_experts_compute_in_the_inputs_dtype():
    """fp32 expert weights (expert-parallel experts live outside DeepSpeed's bf16 module) with bf16
    tokens: every backend computes in bf16 and returns bf16, within bf16 tolerance of fp32."""
    x = torch.randn(64, D)
    want = make_layer("loop")(x).detach()
    for name in ("loop", "grouped"):
        layer = make_layer(name)
        layer.router.to(torch.bfloat16)  # the experts stay fp32
        out = layer(x.bfloat16())
        assert out.dtype == torch.bfloat16, name
        torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05, msg=name)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_grouped_equals_transformers_mixtral_block(implementation):
    """Independent reference: transformers' own Mixtral sparse-MoE block, weights copied across."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=K,
                           hidden_act="silu", router_jitter_noise=0.0)  # fmt: skip
    hf_cfg._experts_implementation = implementation
    hf = MixtralSparseMoeBlock(hf_cfg)
    ours = make_layer()
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.gate.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        hf.experts.down_proj.copy_(ours.experts.down_proj)
    x = torch.randn(3, 11, D)
    if implementation == "grouped_mm":  # forward only: torch's CPU grouped_mm has no backward here
        with torch.no_grad():
            torch.testing.assert_close(hf(x), ours(x), rtol=1e-5, atol=1e-5)
        return
    theirs = run(hf, x)
    mine = run(ours, x)
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine[1], theirs[1], rtol=1e-5, atol=1e-5)
    for ours_name, their_name in [("router.gate.weight", "gate.weight"),
                                  ("experts.gate_up_proj", "experts.gate_up_proj"),
                                  ("experts.down_proj", "experts.down_proj")]:  # fmt: skip
        torch.testing.assert_close(mine[2][ours_name], theirs[2][their_name], rtol=1e-5, atol=1e-5)


def test_router_renormalises_and_balance_loss_has_its_closed_form():
    router = TopKRouter(D, E, K, renormalize=True, jitter=0.0)
    r = router(torch.randn(50, D))
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(50))
    # perfectly balanced assignments and uniform probabilities: E·Σ (1/E)(1/E) = 1
    experts = torch.arange(E).repeat(2).view(-1, K)
    uniform = Routing(torch.full((E, K), 0.5), experts, torch.full((E, E), 1 / E), torch.zeros(E, E))
    assert load_balancing_loss(uniform, E).item() == pytest.approx(1.0)
    # everything to expert 0 with all probability on it: E·1·1 = E
    skewed = Routing(torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.long), torch.eye(E)[[0] * 4],
                     torch.zeros(4, E))  # fmt: skip
    assert load_balancing_loss(skewed, E).item() == pytest.approx(E)


def test_capacity_mode_without_overflow_equals_dropless():
    dropless = make_layer()
    padded = make_layer(capacity_factor=float(E))  # room for every assignment
    padded.load_state_dict(dropless.state_dict())
    x = torch.randn(40, D)
    assert_same(run(padded, x), run(dropless, x))
    assert padded.stats["dropped"].item() == 0.0


def test_capacity_mode_drops_overflow_and_matches_the_loop_on_the_kept_assignments():
    layer = make_layer(capacity_factor=0.5)
    x = torch.randn(64, D)
    y = layer(x)
    with torch.no_grad():
        r = layer.router(x)
        cap = math.ceil(0.5 * 64 * K / E)
        keep, _ = capacity_assignment(r.experts, E, cap)
        weights = r.weights * keep.view(64, K)
        ref = BACKENDS.get("loop")(x, weights, r.experts, layer.experts)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert layer.stats["dropped"].item() == pytest.approx(1 - keep.float().mean().item())
    assert 0 < layer.stats["dropped"].item() < 1
    per_expert = torch.bincount(r.experts.reshape(-1)[keep], minlength=E)
    assert per_expert.max() <= cap


def test_first_choices_have_priority_over_second_choices():
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])
    keep, _ = capacity_assignment(experts, 2, capacity=2)
    # expert 0 gets 1st choices of tokens 0 and 2 before token 1's 2nd; expert 1 gets token 1's 1st
    # choice, then 2nd choices in token order: token 0 fits, token 2 does not
    assert keep.view(3, 2).tolist() == [[True, True], [True, False], [True, False]]


def test_gpt_with_moe_adds_aux_losses_in_training_only_and_counts_active_params():
    cfg = config_from_dict({"model": {"mlp": "moe", "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 16},
                            "moe": {"num_experts": 4, "top_k": 2}})  # fmt: skip
    torch.manual_seed(0)
    m = GPT(cfg.model, 64, cfg.moe)
    x = torch.randint(0, 64, (2, 16))
    _, loss = m(x, x)
    assert loss.item() == pytest.approx((m.last_losses["ce"] + m.last_losses["moe_aux"]).item())
    loss.backward()
    assert m.layers[0].mlp.router.gate.weight.grad.abs().sum() > 0
    m.eval()
    _, val = m(x, x)
    assert val.item() == pytest.approx(m.last_losses["ce"].item()) and "moe_aux" not in m.last_losses
    per_expert = 2 * 32 * cfg.model.hidden_ff + 32 * cfg.model.hidden_ff
    assert m.num_params() - active_params(m) == 2 * 2 * per_expert  # 2 layers × 2 skipped experts
    dense = GPT(config_from_dict({"model": {**cfg.to_dict()["model"], "mlp": "dense"}}).model, 64)
    moe_flops = count_flops_per_token(cfg.model, 64, m)["forward"]
    dense_flops = count_flops_per_token(dense.cfg, 64, dense)["forward"]
    assert moe_flops - dense_flops == 2 * (2 * (32 * 4) + 2 * (2 * 32 * cfg.model.hidden_ff + 32 * cfg.model.hidden_ff))
    # = per layer: router (d·E) plus one extra expert (k=2 vs the dense MLP's one), times 2 FLOPs per MAC


def test_megablocks_refused_clearly_where_it_cannot_run():
    with pytest.raises(ConfigError, match="megablocks needs CUDA"):
        config_from_dict({"model": {"mlp": "moe"}, "moe": {"backend": "megablocks"}})
    if not megablocks_available():
        with pytest.raises(ConfigError, match="'megablocks' cannot run here"):
            resolve_backend(MoEConfig(backend="megablocks"))
        assert resolve_backend(MoEConfig(backend="auto")) == "grouped"


def assert_close_rel(a, b, rel):
    """‖a − b‖ ≤ rel · ‖b‖ for outputs and every gradient (bf16: elementwise checks meet rounding)."""
    for x, y, what in [(a[0], b[0], "output"), (a[1], b[1], "input grad")] + [
            (a[2][n], b[2][n], n) for n in b[2]]:  # fmt: skip
        err = (x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-12)
        assert err <= rel, f"{what}: relative error {float(err):.2e} > {rel}"


def cuda_pair(backend, dtype):
    torch.manual_seed(0)
    layer, ref = make_layer(), make_layer("loop")
    ref.load_state_dict(layer.state_dict())
    layer.backend = BACKENDS.get(backend)
    return layer.cuda().to(dtype), ref.cuda().to(dtype)


def needs_megablocks():
    reason = backends.megablocks_unavailable_reason()
    if reason:
        pytest.skip(f"megablocks: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_megablocks_equals_grouped_on_cuda(dtype):
    needs_megablocks()
    layer, ref = cuda_pair("megablocks", dtype)
    ref.backend = BACKENDS.get("grouped")
    x = torch.randn(512, D, device="cuda", dtype=dtype)
    if dtype == torch.float32:
        assert_same(run(layer, x), run(ref, x), tol=1e-4)
    else:
        assert_close_rel(run(layer, x), run(ref, x), rel=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_on_cuda_equals_the_loop(dtype):
    layer, ref = cuda_pair("grouped", dtype)
    x = torch.randn(512, D, device="cuda", dtype=dtype)
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10):
        assert backends.grouped_mm_applies(x, layer.experts)  # the torch._grouped_mm path is what runs
    if dtype == torch.float32:
        assert_same(run(layer, x), run(ref, x), tol=1e-4)
    else:
        assert_close_rel(run(layer, x), run(ref, x), rel=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["grouped", "megablocks"])
def test_sorted_expert_mlps_on_cuda_equal_the_loop(backend):
    """The forms expert parallelism runs on the rows it receives (one rank: the all-to-all is the
    identity), in bf16."""
    from scalesparse.model.moe.backends import SORTED_MLPS
    from scalesparse.model.moe.expert_parallel import expert_parallel_forward

    if backend == "megablocks":
        needs_megablocks()
    layer, ref = cuda_pair("loop", torch.bfloat16)
    x = torch.randn(256, D, device="cuda", dtype=torch.bfloat16)
    routing = layer.router(x)
    got = expert_parallel_forward(x, routing, layer.experts, E, SORTED_MLPS.get(backend))
    want = BACKENDS.get("loop")(x, routing.weights, routing.experts, layer.experts)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2


@pytest.mark.gpu
def test_auto_picks_megablocks_where_it_imports():
    needs_megablocks()
    assert resolve_backend(MoEConfig(backend="auto")) == "megablocks"


def test_moe_model_exports_and_loads_back(tmp_path):
    from scalesparse.export import load_exported, write_model

    cfg = config_from_dict({"model": {"mlp": "moe", "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 16},
                            "moe": {"num_experts": 4, "top_k": 1, "d_ff": 24}})  # fmt: skip
    torch.manual_seed(0)
    m = GPT(cfg.model, 64, cfg.moe).eval()
    write_model({n: p.detach() for n, p in m.named_parameters()}, cfg.model, 64, tmp_path, moe=cfg.moe)
    assert not (tmp_path / "config.json").exists()  # not a Llama: no transformers config is claimed
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(load_exported(tmp_path).eval()(x)[0], m(x)[0], rtol=0, atol=0)


def test_the_chosen_backend_and_why_are_said_once(capsys):
    backends._announce.cache_clear()
    for _ in range(3):  # three MoE layers
        make_layer("auto")
    out = capsys.readouterr().out
    assert out.count("moe: experts run on the") == 1
    if not megablocks_available():
        assert "'grouped' backend (auto: megablocks unavailable (" in out
