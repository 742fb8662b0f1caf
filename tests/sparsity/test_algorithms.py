"""Each algorithm's defining behaviour, single process, on a small GPT with a real AdamW."""

import math

import pytest
import torch

from scalesparse.config import ModelConfig, SparsityConfig
from scalesparse.model import GPT
from scalesparse.sparsity import SPARSIFIERS
from scalesparse.sparsity.local import local_views
from scalesparse.sparsity.masks import select_layers


def setup(method, steps=100, **kw):
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16), 60)
    cfg = SparsityConfig(method=method, sparsity=kw.pop("sparsity", 0.8), update_interval=kw.pop("interval", 10), **kw)
    layers = select_layers(model, cfg.include, cfg.exclude)
    sp = SPARSIFIERS.get(method)(cfg, {n: tuple(m.weight.shape) for n, m in layers.items()}, steps, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, layers, sp, opt


def train_step(model, layers, sp, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (4, 16), generator=g)
    opt.zero_grad()
    model(x, x.roll(1, 1))[1].backward()
    sp.mask_grads(local_views(layers, opt))
    opt.step()
    sp.apply(local_views(layers, opt))


def dense_grads(model, layers, seed=0):
    x = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(x, x.roll(1, 1))[1].backward()


def test_static_masks_are_exact_fixed_and_dead_weights_stay_zero_with_zero_moments():
    model, layers, sp, opt = setup("static")
    sp.init_masks(local_views(layers, opt))
    first = {n: m.clone() for n, m in sp.masks.items()}
    assert sum(int(m.sum()) for m in sp.masks.values()) == sum(sp.target.values())
    assert sp.sparsity_report()["global"] == pytest.approx(0.8, abs=1e-4)
    for s in range(5):
        train_step(model, layers, sp, opt, s)
    assert not sp.should_update(10)
    for n, layer in layers.items():
        assert torch.equal(sp.masks[n], first[n])
        assert torch.all(layer.weight[~first[n]] == 0)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.all(opt.state[layer.weight][key][~first[n]] == 0)
        assert torch.any(layer.weight[first[n]] != 0)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_drop_and_grow_keeps_sparsity_drops_smallest_and_regrows_at_zero(method):
    model, layers, sp, opt = setup(method)
    sp.init_masks(local_views(layers, opt))
    for s in range(3):
        train_step(model, layers, sp, opt, s)
    dense_grads(model, layers, 99)  # dense gradient at the update (RigL's grow signal)
    before = {n: m.clone() for n, m in sp.masks.items()}
    weights = {n: layers[n].weight.detach().clone() for n in layers}
    grads = {n: layers[n].weight.grad.clone() for n in layers}
    assert sp.should_update(10) and not sp.should_update(11) and not sp.should_update(80)  # stop at 75%
    stats = sp.update(10, local_views(layers, opt))
    frac = sp.drop_fraction(10)
    assert stats["dst_drop_fraction"] == pytest.approx(frac)
    for n in layers:
        old, new = before[n], sp.masks[n]
        w_after = layers[n].weight.detach()
        assert int(new.sum()) == int(old.sum())  # constant sparsity, per layer
        # a weight may be dropped and regrown in the same update (RigL allows it): it then restarts at 0
        kept = old & new & (w_after == weights[n])
        dropped, grown = old & ~kept, new & ~kept
        k = round(frac * int(old.sum()))
        assert int(dropped.sum()) == k and int(grown.sum()) == k
        assert weights[n].abs()[dropped].max() <= weights[n].abs()[kept].min()  # smallest magnitudes go
        assert torch.all(w_after[grown] == 0)
        assert torch.all(opt.state[layers[n].weight]["exp_avg"][grown] == 0)
        assert torch.all(opt.state[layers[n].weight]["exp_avg_sq"][dropped & ~new] == 0)
        if method == "rigl":
            # grown = the largest |grad| among all weights not kept
            assert grads[n].abs()[grown].min() >= grads[n].abs()[~kept & ~grown].max()
    assert stats["dst_churn"] > 0


def test_set_and_rigl_grow_differently():
    picks = {}
    for method in ("set", "rigl"):
        model, layers, sp, opt = setup(method)
        sp.init_masks(local_views(layers, opt))
        train_step(model, layers, sp, opt)
        dense_grads(model, layers, 5)
        before = {n: m.clone() for n, m in sp.masks.items()}
        sp.update(10, local_views(layers, opt))
        picks[method] = {n: sp.masks[n] & ~before[n] for n in before}
    assert any(not torch.equal(picks["set"][n], picks["rigl"][n]) for n in picks["set"])


def test_drop_fraction_schedules():
    _, _, sp, _ = setup("set", steps=100, drop_fraction=0.4)
    assert sp.drop_fraction(0) == pytest.approx(0.4)
    assert sp.drop_fraction(37.5) == pytest.approx(0.2)  # half way to the stop at 75 steps
    assert sp.drop_fraction(75) == pytest.approx(0.0, abs=1e-12)
    _, _, lin, _ = setup("set", steps=100, drop_fraction=0.4, decay="linear")
    assert lin.drop_fraction(37.5) == pytest.approx(0.2)
    _, _, const, _ = setup("set", steps=100, drop_fraction=0.4, decay="constant")
    assert const.drop_fraction(60) == pytest.approx(0.4)


def test_gmp_is_dense_to_sparse_on_the_cubic_schedule():
    model, layers, sp, opt = setup("gmp", steps=100, sparsity=0.9, interval=10, stop_fraction=0.8)
    sp.init_masks(local_views(layers, opt))
    assert sp.sparsity_report()["global"] == 0.0
    for step in range(10, 101, 10):
        train_step(model, layers, sp, opt, step)
        if sp.should_update(step):
            sp.update(step, local_views(layers, opt))
        expected = 0.9 * (1 - (1 - min(1.0, step / 80)) ** 3) if step <= 80 else 0.9
        assert sp.sparsity_report()["global"] == pytest.approx(expected, abs=1e-3), step
    assert sp.sparsity_at(40) == pytest.approx(0.9 * (1 - 0.5**3))


def test_gmp_mean_sparsity_is_the_average_of_its_masks_over_the_run():
    model, layers, sp, opt = setup("gmp", steps=100, sparsity=0.9, interval=10, stop_fraction=0.8)
    sp.init_masks(local_views(layers, opt))
    in_effect = []
    for step in range(100):  # as the training loop: an update after `step` steps holds from then on
        if sp.should_update(step):
            sp.update(step, local_views(layers, opt))
        in_effect.append(sp.sparsity_report()["global"])
    assert sp.mean_sparsity() == pytest.approx(sum(in_effect) / len(in_effect), abs=1e-3)
    # frequent updates over a long run approach the integral of the cubic ramp: s·(3/4·stop + 1 − stop)
    long = SPARSIFIERS.get("gmp")(sp.cfg, sp.shapes, 20_000, seed=7)
    assert long.mean_sparsity() == pytest.approx(0.9 * (0.75 * 0.8 + 0.2), rel=2e-3)
    assert setup("static", sparsity=0.9)[2].mean_sparsity() == 0.9


def test_training_flops_count_gmp_at_the_sparsity_it_trains_at():
    from scalesparse.config import config_from_dict
    from scalesparse.train.driver import model_summary

    def train_flops(method):
        sparsity = {"method": method, "sparsity": 0.9} if method != "none" else {}
        return model_summary(config_from_dict({"sparsity": sparsity}), 100)["flops_per_token_train_sparse"]

    dense, static, gmp = train_flops("none"), train_flops("static"), train_flops("gmp")
    assert static < gmp < dense  # GMP trains dense at first, then as sparse as static
    inference = model_summary(config_from_dict({"sparsity": {"method": "gmp", "sparsity": 0.9}}), 100)
    assert inference["params_nonzero"] == model_summary(config_from_dict({"sparsity": {"method": "static",
                                                         "sparsity": 0.9}}), 100)["params_nonzero"]  # fmt: skip


def test_run_summary_figures_come_from_the_masks_in_force():
    """summary.json's sparsity, nonzero counts and sparse FLOPs read the workers' sparsity log (the
    masks the run held), not the configured target the run is planned with."""
    from scalesparse.config import config_from_dict
    from scalesparse.train.driver import masks_in_force, model_summary, sparse_figures

    log = [{"step": 0, "masked_zeros": 0, "masked_weights": 100}, {"step": 1, "loss": 3.0},
           {"step": 3, "masked_zeros": 60, "masked_weights": 100},
           {"step": 3, "masked_zeros": 60, "masked_weights": 100},  # the same masks, logged again on resume
           {"step": 5, "masked_zeros": 95, "masked_weights": 100}]  # fmt: skip
    # a record at step s holds from step s on: steps 0-2 dense, 3-4 at 60 zeros, 5 at 95
    assert masks_in_force(log, 6) == {"sparsity": 0.95, "zeroed": 95, "zeroed_in_training": round(215 / 6)}
    # a resumed run's log starts at its checkpoint: the steps before count at its first masks
    assert masks_in_force(log[2:], 6)["zeroed_in_training"] == round((5 * 60 + 95) / 6)
    assert masks_in_force([{"step": 1, "loss": 3.0}], 6) is None  # dense

    cfg = config_from_dict({"sparsity": {"method": "rigl", "sparsity": 0.9}})
    planned = model_summary(cfg, 100)
    got = sparse_figures(cfg, planned, 1000, 900)
    assert got["params_nonzero"] == planned["params"] - 1000
    assert got["flops_per_token_inference_sparse"] == planned["flops_per_token_forward"] - 2000
    # RigL's dense gradient every update_interval steps is counted at the zeros in force too
    assert got["flops_per_token_train_sparse"] == 3 * (planned["flops_per_token_forward"] - 1800) + 4000 // 100


def test_snip_keeps_the_largest_connection_sensitivity():
    model, layers, sp, opt = setup("snip", sparsity=0.7)
    dense_grads(model, layers)
    sens = {n: (layers[n].weight * layers[n].weight.grad).abs().detach() for n in layers}
    sp.init_masks(local_views(layers, opt))
    for n in layers:
        kept, dropped = sens[n][sp.masks[n]], sens[n][~sp.masks[n]]
        assert int(sp.masks[n].sum()) == sp.target[n]
        assert kept.min() >= dropped.max()


def test_masks_survive_a_state_dict_round_trip():
    model, layers, sp, opt = setup("set")
    sp.init_masks(local_views(layers, opt))
    state = sp.state_dict()
    _, _, fresh, _ = setup("set")
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.masks[n], sp.masks[n]) for n in sp.masks)
    assert fresh.sparsity_report() == sp.sparsity_report()


def test_positions_are_declared():
    assert str(SPARSIFIERS.get("rigl").position) == "during training, sparse-to-sparse, dynamic mask"
    assert str(SPARSIFIERS.get("gmp").position).startswith("during training, dense-to-sparse")
    assert SPARSIFIERS.get("static").position.mask == "static"
    assert math.isfinite(1.0)


def test_static_nm_and_block_masks_have_their_structure():
    model, layers, sp, opt = setup("static", granularity="nm", n=2, m=4)
    sp.init_masks(local_views(layers, opt))
    for n, mask in sp.masks.items():
        assert torch.all(mask.view(mask.shape[0], -1, 4).sum(-1) == 2), n
        assert torch.all(layers[n].weight[~mask] == 0)
    model, layers, sp, opt = setup("static", granularity="block", block_size=16, sparsity=0.75)
    sp.init_masks(local_views(layers, opt))
    for n, mask in sp.masks.items():
        h, w = mask.shape
        blocks = mask.view(h // 16, 16, w // 16, 16).permute(0, 2, 1, 3).reshape(-1, 256)
        assert torch.all(blocks.all(-1) | ~blocks.any(-1)), n  # every block wholly kept or wholly pruned


def test_block_rigl_updates_whole_blocks_at_constant_count():
    model, layers, sp, opt = setup("rigl", granularity="block", block_size=16, sparsity=0.75)
    sp.init_masks(local_views(layers, opt))
    train_step(model, layers, sp, opt)
    dense_grads(model, layers, 3)
    before = {n: m.clone() for n, m in sp.masks.items()}
    stats = sp.update(10, local_views(layers, opt))
    assert stats["dst_churn"] > 0
    for n, mask in sp.masks.items():
        h, w = mask.shape
        blocks = mask.view(h // 16, 16, w // 16, 16).permute(0, 2, 1, 3).reshape(-1, 256)
        assert torch.all(blocks.all(-1) | ~blocks.any(-1)), n
        assert int(mask.sum()) == int(before[n].sum())
