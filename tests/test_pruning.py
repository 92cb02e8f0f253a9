"""Pruning toolkit: exact sparsity, N:M validity, method ordering, DSnoT, sequential calibration, OWL, masks."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
from conftest import CAUSAL_FAMILIES, VOCAB, make_model

from sparse_peft.masks import is_nm
from sparse_peft.pruning import (
    apply_masks,
    calibration_from_dataset,
    calibration_from_texts,
    dense_snapshot,
    get_masks,
    load_masks,
    prune,
    reconstruction_error,
    repair,
    save_masks,
    sparsity_report,
)
from sparse_peft.pruning.allocation import owl_block_sparsities
from sparse_peft.pruning.calibration import InputStats, decoder_layers, run_sequential
from sparse_peft.pruning.criteria import layer_mask, row_mask, split_evenly
from sparse_peft.pruning.dsnot import dsnot_layer
from sparse_peft.pruning.refit import refit_layer
from sparse_peft.pruning.report import linear_weight, prunable_modules


def calib(n: int = 8, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: linear_weight(m).detach().float().clone() for n, m in prunable_modules(model).items()}


def correlated_model(layers: int = 2) -> nn.Module:
    """Tiny Llama whose block inputs are correlated (low-rank embeddings) with very uneven feature scales."""
    model = make_model("llama", layers=layers)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # (V, d)
        low = torch.randn(emb.shape[0], 4, generator=g) @ torch.randn(4, emb.shape[1], generator=g)
        emb.copy_(low + 0.1 * torch.randn(emb.shape, generator=g) + 0.5)
        for layer in decoder_layers(model):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.exp(1.5 * torch.randn(norm.weight.shape, generator=g)))
    return model


def block_inputs(model, block_index: int, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs ``(T, d_in)`` of every prunable layer of one block, from a plain forward of ``data``."""
    block = decoder_layers(model)[block_index]
    inside = {id(m) for m in block.modules()}
    seen, handles = {}, []
    for name, m in prunable_modules(model).items():
        if id(m) in inside:

            def hook(mod, args, out, name=name):
                seen.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]))

            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=data)
    for h in handles:
        h.remove()
    return seen


# ---------------------------------------------------------------- exact sparsity and N:M


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_layer_sparsity(family, method):
    model = make_model(family)
    report = prune(model, method, 0.5, calibration_data=calib(), progress=False)
    for row in report.modules:
        assert row.zeros == round(0.5 * row.numel), row.name
    assert report.sparsity == 0.5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_wanda_exact_per_row(family):
    model = make_model(family)
    prune(model, "wanda", 0.5, calibration_data=calib(), progress=False)
    for name, w in weights(model).items():
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name


def test_uneven_budget_is_spread_over_rows():
    model = make_model("llama")
    report = prune(model, "wanda", 0.3, calibration_data=calib(), progress=False)
    for name, w in weights(model).items():
        zeros = (w == 0).sum(1)  # (d_out,)
        assert int(zeros.max() - zeros.min()) <= 1, name
        assert int(zeros.sum()) == round(0.3 * w.numel())
    assert abs(report.sparsity - 0.3) < 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_valid(family, method, pattern):
    model = make_model(family)
    report = prune(model, method, None, pattern, calib(), progress=False)
    n, m = (int(v) for v in pattern.split(":"))
    assert report.nm_valid
    for name, w in weights(model).items():
        per_group = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (per_group == n).all(), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bf16(method):
    model = make_model("qwen2", dtype=torch.bfloat16)
    report = prune(model, method, None, "2:4", calib(), progress=False)
    assert report.nm_valid and report.sparsity == 0.5
    assert next(model.parameters()).dtype == torch.bfloat16


def test_split_evenly_sums_exactly():
    for total, sizes in [(7, [1, 1, 1]), (100, [3, 5, 9]), (0, [2, 2]), (13, [128, 128, 64])]:
        parts = split_evenly(total, sizes)
        assert sum(parts) == total and all(p >= 0 for p in parts)


# ---------------------------------------------------------------- quality ordering


def test_error_order_sparsegpt_wanda_magnitude():
    data = calib(16, 16)
    base = correlated_model()
    dense = weights(base)
    x = block_inputs(base, 0, data)  # the calibration inputs of block 0 (identical for every method)
    hess = {n: xi.float().t() @ xi.float() for n, xi in x.items()}
    errors = {}
    for method in ["magnitude", "wanda", "sparsegpt"]:
        model = correlated_model()
        prune(model, method, 0.5, calibration_data=data, progress=False)
        w = weights(model)
        errors[method] = sum(reconstruction_error(dense[n], w[n], hess[n]) for n in hess)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# ---------------------------------------------------------------- DSnoT


def _layer_case(seed=0, d_out=16, d_in=32, t=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 4, generator=g) @ torch.randn(4, d_in, generator=g) + torch.randn(t, d_in, generator=g)
    x = x * torch.exp(torch.randn(d_in, generator=g)) + 2 * torch.randn(d_in, generator=g)  # (t, d_in), non-zero mean
    stats = InputStats(want_hessian=True, want_sum=True)
    stats.add(x)
    w = torch.randn(d_out, d_in, generator=g)
    return w, stats


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("objective", ["mse", "mean"])
def test_dsnot_keeps_sparsity_and_lowers_error(nm, objective):
    w, stats = _layer_case()
    from sparse_peft.masks import nm_mask

    keep = nm_mask(w, *nm) if nm else w.abs() >= w.abs().median(1, keepdim=True).values
    pruned = w * keep
    out = dsnot_layer(w, pruned, stats, nm, max_cycles=16, objective=objective)
    assert torch.equal((out != 0).sum(1), (pruned != 0).sum(1))  # per-row count exact
    if nm:
        assert is_nm(out, *nm)
    kept = out != 0
    assert torch.equal(out[kept], w[kept])  # revived weights return to their dense values
    eps = lambda v: ((w - v) * stats.mean).sum(1).abs().sum()  # expected error, summed over rows
    before, after = reconstruction_error(w, pruned, stats.hessian), reconstruction_error(w, out, stats.hessian)
    if objective == "mse":
        assert after < before
    else:
        assert eps(out) < eps(pruned)
    assert not torch.equal(out, pruned)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_repair_model_keeps_rows_and_lowers_error(pattern):
    data = calib(16, 16)
    model = correlated_model()
    dense = dense_snapshot(model)
    x = block_inputs(model, 0, data)
    prune(model, "magnitude", None if pattern else 0.5, pattern, progress=False)
    before_w = weights(model)
    report = repair(model, data, dense, pattern, progress=False)
    after_w = weights(model)
    for name in after_w:
        assert torch.equal((after_w[name] == 0).sum(1), (before_w[name] == 0).sum(1)), name
    assert pattern is None or report.nm_valid
    err = lambda w: sum(reconstruction_error(dense[n], w[n], x[n].t() @ x[n]) for n in x)
    assert err(after_w) < err(before_w)


@pytest.mark.parametrize("true_sequential", [True, False])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_with_inline_repair(method, true_sequential):
    model = make_model("llama")
    report = prune(model, method, None, "2:4", calib(), repair=True, true_sequential=true_sequential, progress=False)
    assert report.nm_valid and report.sparsity == 0.5


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_inline_repair_lowers_block_error(method):
    """Inline DSnoT after each layer: rows keep their zero counts, and block 0 (same inputs) ends closer to dense."""
    data = calib(16, 16)
    base = correlated_model()
    dense = weights(base)
    x = block_inputs(base, 0, data)
    plain, repaired = correlated_model(), correlated_model()
    prune(plain, method, 0.5, calibration_data=data, true_sequential=False, progress=False)
    prune(repaired, method, 0.5, calibration_data=data, true_sequential=False, repair=True, progress=False)
    wp, wr = weights(plain), weights(repaired)
    for name in wp:
        assert torch.equal((wp[name] == 0).sum(1), (wr[name] == 0).sum(1)), name
    err = lambda w: sum(reconstruction_error(dense[n], w[n], x[n].t() @ x[n]) for n in x)
    assert err(wr) <= err(wp)


# ---------------------------------------------------------------- least-squares refit


def _damped_exact_refit(w, pruned, hessian, percdamp=0.01):
    """Reference: each row's kept weights from one direct solve of the damped normal equations."""
    H = hessian.clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        keep = pruned[i] != 0
        out[i, keep] = torch.linalg.solve(H[keep][:, keep], (H @ w[i])[keep])
    return out


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_refit_reaches_the_least_squares_weights_and_keeps_the_mask(nm):
    w, stats = _layer_case(d_in=32)
    from sparse_peft.masks import nm_mask

    keep = nm_mask(w, *nm) if nm else w.abs() >= w.abs().median(1, keepdim=True).values
    pruned = w * keep
    out = refit_layer(w, pruned, stats.hessian, max_iters=200, tol=1e-12)
    assert torch.equal(out != 0, pruned != 0)  # same mask: per-row counts and N:M unchanged
    assert nm is None or is_nm(out, *nm)
    torch.testing.assert_close(out, _damped_exact_refit(w, pruned, stats.hessian), rtol=1e-3, atol=1e-4)
    before, after = reconstruction_error(w, pruned, stats.hessian), reconstruction_error(w, out, stats.hessian)
    assert after < 0.9 * before
    assert torch.equal(pruned, w * keep)  # inputs untouched


def test_refit_lowers_the_error_of_sparsegpt_and_stops_when_converged():
    from sparse_peft.pruning.sparsegpt import sparsegpt_prune

    w, stats = _layer_case(d_out=24, d_in=64, t=512)
    obs = sparsegpt_prune(w, stats.hessian, w.numel() // 2)
    few, many = refit_layer(w, obs, stats.hessian, max_iters=3), refit_layer(w, obs, stats.hessian, max_iters=100)
    errors = [reconstruction_error(w, v, stats.hessian) for v in (obs, few, many)]
    assert errors[0] > errors[1] > errors[2], errors  # the OBS sweep is not the optimum for its own mask
    exact = _damped_exact_refit(w, obs, stats.hessian)
    assert torch.equal(refit_layer(w, exact, stats.hessian, tol=1e-6), exact)  # converged: no step taken


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_prune_with_refit_keeps_sparsity_and_lowers_block_error(method, pattern):
    """Refit after each layer: exact counts per row and N:M kept; block 0 (same inputs) ends closer to dense."""
    data = calib(16, 16)
    base = correlated_model()
    dense = weights(base)
    x = block_inputs(base, 0, data)
    plain, refit = correlated_model(), correlated_model()
    sparsity = None if pattern else 0.5
    prune(plain, method, sparsity, pattern, data, true_sequential=False, progress=False)
    report = prune(refit, method, sparsity, pattern, data, true_sequential=False, refit=True, progress=False)
    wp, wr = weights(plain), weights(refit)
    for name in wp:
        assert torch.equal((wp[name] == 0).sum(1), (wr[name] == 0).sum(1)), name
    for name in x:  # block 0 sees the same inputs either way: the very same masks
        assert torch.equal(wp[name] == 0, wr[name] == 0), name
    assert pattern is None or report.nm_valid
    err = lambda w: sum(reconstruction_error(dense[n], w[n], x[n].t() @ x[n]) for n in x)
    assert err(wr) < err(wp)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_with_repair_and_refit_true_sequential(method):
    model = make_model("qwen3")
    report = prune(model, method, 0.5, calibration_data=calib(), repair=True, refit=True, progress=False)
    for row in report.modules:
        assert row.zeros == round(0.5 * row.numel), row.name


# ---------------------------------------------------------------- sequential calibration


def test_block_k_sees_pruned_outputs_of_block_k_minus_1():
    data = calib(4, 16)
    model = make_model("llama")
    q1 = decoder_layers(model)[1].self_attn.q_proj
    dense_input = block_inputs(model, 1, data)[next(n for n in prunable_modules(model) if "layers.1.self_attn.q" in n)]
    seen = []
    handle = q1.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().clone()) and None)
    prune(model, "wanda", 0.5, calibration_data=data, batch_size=4, progress=False)
    handle.remove()
    during = seen[0].reshape(-1, seen[0].shape[-1])  # first call = block 1's statistics pass
    after = block_inputs(model, 1, data)[next(n for n in prunable_modules(model) if "layers.1.self_attn.q" in n)]
    torch.testing.assert_close(during, after)  # block 0 was already pruned when block 1 was calibrated
    assert not torch.allclose(during, dense_input, atol=1e-4)


def _magnitude_per_layer(index, modules, stats):
    """A ``process`` for :func:`run_sequential` that halves each layer by magnitude."""
    for module in modules.values():
        w = linear_weight(module)
        w.mul_(row_mask(w.abs(), w.numel() // 2))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_layer_stats_see_the_pruned_layers_before(family):
    """true_sequential: each layer's statistics are those of its inputs in the final pruned model."""
    data = calib(8, 16)
    model = make_model(family)
    seen, order = {}, []

    def process(index, modules, stats):
        assert len(modules) == 1  # one layer at a time
        (name,) = modules
        seen[name] = stats[name].sq_sum.clone()
        order.append(name)
        _magnitude_per_layer(index, modules, stats)

    run_sequential(model, data, process, per_layer=True, batch_size=3, progress=False)  # batches of 3, 3, 2
    assert order == list(prunable_modules(model))  # call order: q, k, v, o, gate, up, down (Llama)
    for b in range(len(decoder_layers(model))):
        for name, xi in block_inputs(model, b, data).items():
            torch.testing.assert_close(seen[name], (xi.float() ** 2).sum(0), rtol=1e-4, atol=1e-5)


def test_per_block_stats_come_from_the_unpruned_block():
    """true_sequential=False: a block's later layers are calibrated on the unpruned block's activations."""
    data = calib(8, 16)
    model = make_model("llama")
    seen = {}

    def process(index, modules, stats):
        seen.update({n: s.sq_sum.clone() for n, s in stats.items()})
        _magnitude_per_layer(index, modules, stats)

    run_sequential(model, data, process, per_layer=False, batch_size=3, progress=False)
    down = next(n for n in seen if "layers.0.mlp.down_proj" in n)
    after = block_inputs(model, 0, data)[down]
    assert not torch.allclose(seen[down], (after.float() ** 2).sum(0), rtol=1e-3)


def test_per_layer_error_propagates_and_threads_end():
    import threading

    model = make_model("llama")
    before = threading.active_count()
    calls = []

    def process(index, modules, stats):
        calls.append(index)
        if len(calls) == 3:
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run_sequential(model, calib(8, 16), process, per_layer=True, batch_size=2, progress=False)
    assert threading.active_count() == before  # every batch thread was unwound


@pytest.fixture
def threads_plus_one():
    """Run the test with one intra-op thread more than torch's choice (a count the user set), then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    yield before + 1
    torch.set_num_threads(before)


@pytest.mark.parametrize("progress", [False, True])
@pytest.mark.parametrize("method,true_sequential", [("wanda", True), ("sparsegpt", True), ("sparsegpt", False)])
def test_prune_leaves_threads_and_thread_count_as_found(threads_plus_one, method, true_sequential, progress):
    """No thread started by prune() (batch threads, a spinning helper, tqdm's monitor) is alive after it returns, and
    the caller's intra-op thread count is what it was, although SparseGPT's sweep runs on one thread."""
    from tqdm import auto, std

    model = make_model("llama")
    for bar in (std.tqdm, auto.tqdm):  # tqdm's monitor thread, started by an earlier test: stop it so a new one shows
        if bar.__dict__.get("monitor") is not None:
            bar.monitor.exit()
            bar.monitor = None
    before = {t.ident for t in threading.enumerate()}
    prune(
        model, method, 0.5, calibration_data=calib(), true_sequential=true_sequential, batch_size=2, progress=progress
    )
    assert {t.name for t in threading.enumerate() if t.ident not in before} == set()
    assert torch.get_num_threads() == threads_plus_one
    repair(model, calib(), dense=make_model("llama"), max_cycles=2, batch_size=2, progress=progress)
    assert {t.name for t in threading.enumerate() if t.ident not in before} == set()
    assert torch.get_num_threads() == threads_plus_one


def _settings() -> tuple:
    return (
        torch.is_autocast_enabled("cpu"),
        torch.get_autocast_dtype("cpu"),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
    )


@pytest.mark.parametrize("inference", [False, True])
def test_per_layer_batches_run_with_the_callers_settings(threads_plus_one, inference):
    """The per-layer pass runs each batch in a thread of its own: it computes with the caller's autocast, thread count
    and grad/inference mode, exactly as the block-at-a-time pass does in the caller's thread."""
    model = make_model("llama")
    seen = {True: [], False: []}
    per_layer = True
    handle = decoder_layers(model)[1].register_forward_pre_hook(lambda m, a: seen[per_layer].append(_settings()))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode(inference):
            caller = _settings()
            for per_layer in (True, False):
                run_sequential(model, calib(6, 16), lambda *a: None, per_layer=per_layer, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert caller[:3] == (True, torch.bfloat16, threads_plus_one)
    in_pass = (*caller[:3], False, inference)  # run_sequential runs under no_grad
    assert seen[True] == seen[False] == [in_pass] * 3  # three batches


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_per_layer_batches_run_on_the_callers_stream():
    model = make_model("llama").cuda()
    seen = []
    handle = decoder_layers(model)[1].register_forward_pre_hook(lambda m, a: seen.append(torch.cuda.current_stream()))
    stream = torch.cuda.Stream()
    try:
        with torch.cuda.stream(stream):
            run_sequential(model, calib(4, 16), lambda *a: None, per_layer=True, batch_size=2, progress=False)
        torch.cuda.synchronize()
    finally:
        handle.remove()
    assert seen == [stream] * 2


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_true_sequential_false_keeps_exact_sparsity(method):
    model = make_model("qwen3")
    report = prune(model, method, 0.5, calibration_data=calib(), true_sequential=False, progress=False)
    assert all(row.zeros == round(0.5 * row.numel) for row in report.modules)


def test_masks_match_stable_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (7, 12), generator=g).float()  # many ties
    for count in [0, 5, 41, 42, 83, 84]:
        order = torch.sort(scores.reshape(-1), stable=True).indices
        expect = torch.ones(scores.numel(), dtype=torch.bool)
        expect[order[:count]] = False
        assert torch.equal(layer_mask(scores, count), expect.reshape(scores.shape))
        per_row = split_evenly(count, [1] * 7)
        keep = row_mask(scores, count)
        for r in range(7):
            order = torch.sort(scores[r], stable=True).indices
            assert torch.equal(keep[r].nonzero().flatten().sort().values, order[per_row[r] :].sort().values)


def test_input_stats_hessian_in_pieces():
    g = torch.Generator().manual_seed(0)
    stats = InputStats(want_hessian=True, want_sum=True)
    xs = [torch.randn(40, 3, 400, generator=g) for _ in range(3)]  # (batch, seq, d_in): 400 spans 3 blocks
    for i, x in enumerate(xs):
        stats.add(x)
        flat = torch.cat(xs[: i + 1]).reshape(-1, 400)  # (T, d_in)
        torch.testing.assert_close(stats.hessian, flat.t() @ flat, rtol=1e-5, atol=1e-3)  # read between adds too
    assert torch.equal(stats.hessian, stats.hessian.t()) and stats.count == 360
    torch.testing.assert_close(stats.mean, flat.mean(0))


def test_inverse_hessian_factor():
    from sparse_peft.pruning.sparsegpt import hessian_factor

    _, stats = _layer_case(d_in=24)
    h = stats.hessian.clone()
    h[3] = 0
    h[:, 3] = 0  # a dead input
    u, dead = hessian_factor(h, percdamp=0.01)
    assert dead.tolist() == [i == 3 for i in range(24)]
    assert torch.equal(u, u.triu()) and (u.diagonal() > 0).all()
    h[3, 3] = 1
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(24)
    torch.testing.assert_close(u.t() @ u @ damped, torch.eye(24), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- OWL


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_owl_global_sparsity_exact(sparsity):
    model = correlated_model(layers=4)
    total = sum(w.numel() for w in weights(model).values())
    report = prune(
        model,
        "wanda",
        sparsity,
        calibration_data=calib(),
        allocation="owl",
        owl_threshold=2.0,
        owl_lambda=0.1,
        progress=False,
    )
    assert report.zeros == round(sparsity * total)
    per_block = {}
    for row in report.modules:
        block = row.name.split(".layers.")[1].split(".")[0]
        per_block.setdefault(block, []).append(row.sparsity)
    means = [sum(v) / len(v) for v in per_block.values()]
    assert max(means) - min(means) > 0.01  # the allocation is not uniform


def test_owl_block_sparsities_keep_weighted_mean():
    s = owl_block_sparsities([0.01, 0.05, 0.02, 0.03], [10, 10, 20, 10], 0.6, lam=0.08)
    assert abs(sum(v * n for v, n in zip(s, [10, 10, 20, 10])) / 50 - 0.6) < 1e-9
    assert s[1] == min(s)  # most outliers -> lowest sparsity


# ---------------------------------------------------------------- masks as data


def test_masks_roundtrip_and_lora_star(tmp_path):
    model = make_model("gpt2")
    dense = dense_snapshot(model)
    prune(model, "wanda", None, "2:4", calib(), progress=False)
    masks = get_masks(model)
    save_masks(masks, tmp_path / "masks.safetensors")
    loaded = load_masks(tmp_path / "masks.safetensors")
    assert masks.keys() == loaded.keys() and all(torch.equal(masks[k], loaded[k]) for k in masks)
    with torch.no_grad():  # "merged dense LoRA": every weight moves, zeros included
        for name, m in prunable_modules(model).items():
            linear_weight(m).copy_(dense[name] + 0.01)
    assert sparsity_report(model).sparsity == 0
    report = apply_masks(model, loaded, nm_pattern="2:4")
    assert report.nm_valid and report.sparsity == 0.5
    assert all(torch.equal(get_masks(model)[k], masks[k]) for k in masks)


def test_apply_masks_rejects_mismatch():
    model = make_model("llama")
    masks = get_masks(model)
    name = next(iter(masks))
    with pytest.raises(ValueError, match="missing"):
        apply_masks(model, {k: v for k, v in masks.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(model, {**masks, name: masks[name][:, :-1]})


# ---------------------------------------------------------------- calibration helpers


class _Tok:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 100) for c in text]}


def test_calibration_helpers():
    texts = ["hello world " * 5, "sparse models " * 7]
    ids = calibration_from_texts(_Tok(), texts, nsamples=6, seq_len=10)
    assert ids.shape == (6, 10) and ids.dtype == torch.long
    import datasets

    ds = datasets.Dataset.from_dict({"body": texts})
    assert calibration_from_dataset(ds, _Tok(), "body", nsamples=3, seq_len=10).shape == (3, 10)
    with pytest.raises(ValueError, match="text_column"):
        calibration_from_dataset(ds, _Tok(), "text")
    with pytest.raises(ValueError, match="seq_len"):
        calibration_from_texts(_Tok(), ["ab"], nsamples=2, seq_len=10)


def test_iterable_calibration_batches():
    model = make_model("mistral")
    report = prune(model, "sparsegpt", 0.5, calibration_data=[calib(4), calib(4, seed=1)], progress=False)
    assert report.sparsity == 0.5


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match=r"sparsity=.*\[0, 1\)"):
        prune(make_model("llama"), "magnitude", sparsity)


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4", "2-4"])
def test_bad_pattern(pattern):
    with pytest.raises(ValueError, match="pattern"):
        prune(make_model("llama"), "magnitude", None, pattern)


def test_pattern_must_divide_input_dim():
    with pytest.raises(ValueError, match="divisible by M=3"):
        prune(make_model("llama"), "magnitude", None, "2:3")


def test_other_bad_arguments():
    model = make_model("llama")
    with pytest.raises(ValueError, match="method="):
        prune(model, "random", 0.5)
    with pytest.raises(ValueError, match="calibration_data"):
        prune(model, "wanda", 0.5)
    with pytest.raises(ValueError, match="disagrees"):
        prune(model, "wanda", 0.3, "2:4", calib())
    with pytest.raises(ValueError, match="allocation"):
        prune(model, "wanda", None, "2:4", calib(), allocation="owl")
    with pytest.raises(ValueError, match="calibration_data"):
        prune(model, "magnitude", 0.5, refit=True)
    with pytest.raises(ValueError, match="refit_iters"):
        prune(model, "sparsegpt", 0.5, calibration_data=calib(), refit=True, refit_iters=0)
    with pytest.raises(ValueError, match="decoder blocks"):
        prune(make_model("bert"), "wanda", 0.5, calibration_data=calib())
    assert sparsity_report(model).sparsity == 0  # nothing was pruned by the failed calls


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cuda_block_offload(method):
    model = make_model("llama")
    report = prune(model, method, None, "2:4", calib(), device="cuda", progress=False)
    assert report.nm_valid and next(model.parameters()).device.type == "cpu"


# ---------------------------------------------------------------- SparseGPT against the reference loop


def _sparsegpt_reference(w, h, sparsity, nm, blocksize=128, percdamp=0.01):
    """The column-by-column loop of the SparseGPT paper's code (per-block threshold, no exact count)."""
    from sparse_peft.pruning.sparsegpt import _inverse_hessian_factor

    W, H = w.clone(), h.clone()
    hinv = _inverse_hessian_factor(H, percdamp)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Hinv1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            tmp = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = round(tmp.numel() * sparsity)
            mask1.view(-1)[torch.topk(tmp.reshape(-1), k, largest=False).indices] = True
        for i in range(i2 - i1):
            w_col, d = W1[:, i], Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i : i + nm[1]] ** 2 / torch.diag(Hinv1)[i : i + nm[1]].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, nm[1] - nm[0], dim=1, largest=False)[1], True)
            q = w_col.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w_col - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_reference_loop(nm):
    from sparse_peft.pruning.sparsegpt import sparsegpt_prune

    w, stats = _layer_case(seed=5, d_out=24, d_in=64, t=512)
    h = stats.hessian
    ours = sparsegpt_prune(w, h, count=round(0.5 * w.numel()), nm=nm, blocksize=32)
    ref = _sparsegpt_reference(w, h, 0.5, nm, blocksize=32)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_dsnot_prefix_error_matches_direct_sum():
    from sparse_peft.pruning.dsnot import _prefix_mse

    w, stats = _layer_case(d_out=5, d_in=32)
    g = torch.Generator().manual_seed(0)
    delta = w * (torch.rand(w.shape, generator=g) > 0.5)
    gi = torch.stack([torch.randperm(32, generator=g)[:6] for _ in range(5)])
    pi = torch.stack([torch.randperm(32, generator=g)[:6] for _ in range(5)])
    cg, cp = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    fast = _prefix_mse(delta, stats.hessian, gi, pi, cg, cp)  # (5, 7)
    for t in range(7):
        d = delta.clone()
        for r in range(5):
            for i in range(t):
                d[r, gi[r, i]] += cg[r, i]
                d[r, pi[r, i]] += cp[r, i]
        torch.testing.assert_close(fast[:, t], ((d @ stats.hessian) * d).sum(1), rtol=1e-4, atol=1e-3)
