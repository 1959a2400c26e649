"""The exact sampler of the linear models (method="exact"): its transitions against the moment
ODEs and closed forms, its samples against the theory and the Euler scheme, overflow, refusals.

Statistical checks as in test_theory: means within 4.5 standard errors, variances within the
1e-5 / 1 - 1e-5 chi-square quantiles, two-sample differences within 4.5 standard errors.
"""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import chi2, f as fdist

from lesde import model as m
from lesde import theory
from lesde.phase import PhaseSpec, run_sweep
from lesde.solvers import LESDEOverflowWarning, initial_state, simulate
from problems import (balanced_labels, check_gaussian_moments, check_within_class_spread,
                      class_constant_x0, unbalanced_labels)

K, N_PER, SIGMA, R = 3, 4, 0.5, 2000


def _impacts(kind, Kc=K):
    if kind == "constant":
        return m.Impacts.intra_inter(1.0, 0.3, Kc)
    if kind == "power_law":
        return m.Impacts.intra_inter(m.PowerLaw(2.0, 0.8, t0=0.5), m.PowerLaw(0.5, 1.2, t0=0.5), Kc)
    if kind == "matrix":
        return m.Impacts(np.array([[1.0, 0.3, -0.2], [0.4, 1.5, 0.1], [0.2, 0.5, 0.8]]))
    if kind == "batched":
        return m.Impacts.intra_inter(np.array([1.0, 0.2, 1.0]), np.array([0.3, 0.9, 0.3]), Kc)
    if kind == "function":
        return m.Impacts(lambda t: np.array([[1.0, 0.2 * np.cos(t), 0.1], [0.3, 0.8, 0.0],
                                             [0.0, 0.4, 1.2 + 0.5 * np.sin(t)]]))
    raise ValueError(kind)


@pytest.mark.parametrize("labels", ["balanced", "unbalanced"])
@pytest.mark.parametrize("kind", ["constant", "power_law", "matrix", "batched", "function"])
@pytest.mark.parametrize("field", ["identity", "label_projection"])
def test_transition_equals_moment_odes(field, kind, labels):
    y = balanced_labels(K, N_PER) if labels == "balanced" else unbalanced_labels()
    p = 2 if field == "identity" else K
    imp = _impacts(kind)
    sigma = SIGMA if kind != "function" else (lambda t: 0.3 + 0.1 * t)
    m0 = np.random.default_rng(0).standard_normal((K, p))
    t0, t1 = 0.3, 1.7
    tr = theory.mean_transition(imp, y, field, p, t0, t1, sigma=sigma)
    assert tr.per_coordinate == (field == "identity")
    for b in range(tr.phi.shape[0]):
        mean, cov = theory.class_mean_moments(imp, y, field, [t0, t1], m0, sigma=sigma, batch_index=b)
        if tr.per_coordinate:
            got_mean, got_cov = tr.phi[b] @ m0, np.kron(tr.cov[b], np.eye(p))
        else:
            got_mean, got_cov = (tr.phi[b] @ m0.ravel()).reshape(K, p), tr.cov[b]
        np.testing.assert_allclose(got_mean, mean[-1], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(got_cov, cov[-1], rtol=1e-7, atol=1e-10)
    expect_w = (0.3 ** 2 * (t1 - t0) + 0.3 * 0.1 * (t1 ** 2 - t0 ** 2) + 0.01 * (t1 ** 3 - t0 ** 3) / 3
                if kind == "function" else SIGMA ** 2 * (t1 - t0))
    np.testing.assert_allclose(tr.within_var, expect_w, rtol=1e-9)


def test_transition_doubling_keeps_both_modes_precise():
    # I-model, constant impacts, a long interval: the grand mean grows by exp(20), the centred
    # means by exp(10). 2^k doublings of a short step must give both modes' covariances to the
    # closed form's accuracy although the centred one is 1e-8 of the grand one.
    imp = m.Impacts.intra_inter(1.0, 0.25, K)
    ts = [0.0, 40.0]   # (A + 2B)/3 = 0.5 t, (A - B)/3 = 0.25 t
    tr = theory.mean_transition(imp, balanced_labels(K, N_PER), "identity", 2, ts[0], ts[1], sigma=SIGMA)
    cf = theory.imodel_modes(imp, N_PER, ts, sigma=SIGMA)
    J = np.ones((K, K)) / K
    np.testing.assert_allclose(tr.phi[0], cf["grand_growth"][1] * J + cf["centred_growth"][1] * (np.eye(K) - J),
                               rtol=1e-10)
    cov = tr.cov[0]
    grand, centred = J @ cov @ J, (np.eye(K) - J) @ cov @ (np.eye(K) - J)
    cf_grand = J @ cf["cov"][1] @ J
    cf_centred = (np.eye(K) - J) @ cf["cov"][1] @ (np.eye(K) - J)
    assert np.abs(cf_centred).max() < 1e-8 * np.abs(cf_grand).max()
    np.testing.assert_allclose(grand, cf_grand, rtol=1e-9)
    np.testing.assert_allclose(centred, cf_centred, rtol=1e-5, atol=1e-5 * np.abs(cf_centred).max())


def test_no_false_overflow_where_only_the_covariance_would_overflow():
    # I-model, alpha = beta = 1, not co-moving: the grand mean grows by exp(t), so at t = 400
    # the state is about 1e173 (finite) while its variance, 1e347, is not representable. The
    # square-root transition keeps the run; the moment-ODE route would have reported overflow.
    y = balanced_labels(K, 5)
    sde = m.LESDE(y, m.Impacts.intra_inter(1.0, 1.0, K), "identity", sigma=0.1, dim=2)
    x0 = initial_state(4, y.size, 2, std=0.5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LESDEOverflowWarning)
        sol = simulate(sde, x0, [0.0, 200.0, 400.0], method="exact", seed=0)
    assert np.isfinite(sol.states).all() and not sol.overflowed.any()
    grand = np.abs(sol.class_means[-1].mean(1)).max()
    assert 1e165 < grand < 1e180
    tr = theory.mean_transition(sde.impacts, y, "identity", 2, 0.0, 400.0, sigma=0.1)
    with np.errstate(over="ignore"):
        assert np.isfinite(tr.chol).all() and not np.isfinite(tr.cov).all()


def test_transition_without_noise_and_bad_input():
    tr = theory.mean_transition(_impacts("constant"), balanced_labels(K, 2), "identity", 2, 0.0, 1.0)
    assert np.all(tr.chol == 0) and np.all(tr.within_var == 0)
    with pytest.raises(ValueError, match="linear fields"):
        theory.mean_transition(_impacts("constant"), balanced_labels(K, 2), "cross_entropy", 3, 0.0, 1.0)
    with pytest.raises(ValueError, match="t1 > t0"):
        theory.mean_transition(_impacts("constant"), balanced_labels(K, 2), "identity", 2, 1.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model", ["I-constant", "I-power_law", "L-constant", "L-power_law"])
def test_exact_sampler_matches_exact_moments(model, dtype):
    field = "identity" if model.startswith("I") else "label_projection"
    p = 2 if field == "identity" else K
    imp = _impacts(model.split("-")[1])
    y = balanced_labels(K, N_PER)
    x0, m0 = class_constant_x0(y, p, seed=3)
    ts = np.array([0.0, 0.5, 1.0, 3.0])
    sde = m.LESDE(y, imp, field, sigma=SIGMA, dim=p)
    sol = simulate(sde, torch.as_tensor(x0, dtype=dtype), ts, method="exact", num_runs=R,
                   seed=500 + (dtype == torch.float64), record="summary")
    assert sol.params["method"] == "exact" and sol.params["dt"] is None
    mean, cov = theory.class_mean_moments(imp, y, field, ts, m0, sigma=SIGMA)
    for i in (1, 2, 3):
        check_gaussian_moments(sol.class_means[i].reshape(R, -1), mean[i].ravel(), cov[i])
        check_within_class_spread(sol.within_cov[i], N_PER, SIGMA ** 2 * ts[i])


def test_exact_sampler_unbalanced_time_varying_sigma_and_initial_spread():
    # unbalanced classes, a function-of-time E and sigma, features starting with within-class
    # spread: class means against the moment ODEs (started from the sample means), the
    # within-class second moment against within0 + (1 - 1/n_k) int sigma^2 per coordinate
    y = unbalanced_labels()
    counts = np.bincount(y)
    imp = _impacts("function")
    sigma = lambda t: 0.3 + 0.1 * t
    sde = m.LESDE(y, imp, "identity", sigma=sigma, dim=2)
    x0 = np.random.default_rng(8).standard_normal((y.size, 2))
    ts = np.array([0.0, 0.7, 2.0])
    sol = simulate(sde, x0, ts, method="exact", num_runs=R, seed=9, record="summary")
    m0 = np.stack([x0[y == k].mean(0) for k in range(K)])
    mean, cov = theory.class_mean_moments(imp, y, "identity", ts, m0, sigma=sigma)
    w0 = sol.within_cov[0, 0]                                          # (K, 2, 2), same for all runs
    for i in (1, 2):
        check_gaussian_moments(sol.class_means[i].reshape(R, -1), mean[i].ravel(), cov[i])
        s2 = 0.09 * ts[i] + 0.03 * ts[i] ** 2 + 0.01 * ts[i] ** 3 / 3
        expect = w0 + (1 - 1 / counts)[:, None, None] * s2 * np.eye(2)
        got = sol.within_cov[i].mean(0)
        # each diagonal entry: mean of R samples; (1/n) sum of squares of n - 1 independent
        # N(0, s2) parts plus the fixed initial spread: variance about (2 s2^2 (n-1) + 4 s2 n w0)/n^2
        var = (2 * s2 ** 2 * (counts - 1)[:, None] + 4 * s2 * counts[:, None] * np.diagonal(w0, axis1=1, axis2=2)) \
            / counts[:, None] ** 2
        se = np.sqrt(var / R)
        z = np.abs(np.diagonal(got - expect, axis1=1, axis2=2)) / se
        assert z.max() < 4.5, z


def test_exact_sampler_agrees_with_euler_at_small_dt():
    # two-sample check against the Gaussian Euler scheme at dt = 0.002 (bias below 0.1 standard
    # errors), L-model, batched impacts, uneven save times
    y = balanced_labels(K, N_PER)
    alphas = np.array([1.0, 0.4])
    imp = m.Impacts.intra_inter(np.tile(alphas, R // 2), 0.3, K)
    sde = m.LESDE(y, imp, "label_projection", sigma=SIGMA)
    x0, _ = class_constant_x0(y, K, seed=1)
    ts = np.array([0.0, 0.3, 1.0])
    ex = simulate(sde, x0, ts, method="exact", seed=1, record="summary")
    eu = simulate(sde, x0, ts, 0.002, seed=2, record="summary")
    for i in (1, 2):
        for b in range(2):
            a = ex.class_means[i, b::2].reshape(R // 2, -1)
            c = eu.class_means[i, b::2].reshape(R // 2, -1)
            se = np.sqrt(a.var(0) / a.shape[0] + c.var(0) / c.shape[0])
            assert (np.abs(a.mean(0) - c.mean(0)) / se).max() < 4.5
            ratio = a.var(0, ddof=1) / c.var(0, ddof=1)
            n1 = a.shape[0] - 1
            assert np.all((ratio > fdist.ppf(1e-5, n1, n1)) & (ratio < fdist.ppf(1 - 1e-5, n1, n1)))
        wa = np.diagonal(ex.within_cov[i], axis1=-2, axis2=-1)
        wc = np.diagonal(eu.within_cov[i], axis1=-2, axis2=-1)
        se = math.sqrt(wa.var() / wa.size + wc.var() / wc.size)
        assert abs(wa.mean() - wc.mean()) < 4.5 * se


def test_exact_sampler_full_states_and_reproducibility():
    y = unbalanced_labels()
    sde = m.LESDE(y, _impacts("constant"), "identity", sigma=SIGMA, dim=2)
    x0 = initial_state(3, y.size, 2, seed=0)
    a = simulate(sde, x0, [0.0, 0.5, 1.0], method="exact", seed=4)
    b = simulate(sde, x0, [0.0, 0.5, 1.0], method="exact", seed=4)
    np.testing.assert_array_equal(a.states, b.states)
    np.testing.assert_array_equal(a.states[0], x0.numpy())
    for k in range(K):   # the summaries are those of the states
        np.testing.assert_allclose(a.class_means[:, :, k], a.states[:, :, y == k].mean(2), atol=1e-12)
    c = simulate(sde, x0, [0.0, 0.5, 1.0], 0.25, method="exact", seed=5)      # dt is ignored
    assert np.abs(c.states[-1] - a.states[-1]).max() > 1e-3


def test_exact_sampler_overflow_detected_and_reported():
    # run 1's grand mean grows like exp(200 t): float64 overflows between t = 3 and t = 4
    y = balanced_labels(2, 3)
    sde = m.LESDE(y, m.Impacts.intra_inter(np.array([1.0, 400.0]), 0.0, 2), "identity", sigma=0.1, dim=2)
    x0 = initial_state(2, 6, 2, seed=0)
    with pytest.warns(LESDEOverflowWarning, match="overflowed"):
        sol = simulate(sde, x0, np.arange(0.0, 11.0), method="exact", seed=1)
    assert np.isnan(sol.overflow_time[0]) and np.isfinite(sol.states[:, 0]).all()
    assert sol.overflow_time[1] in (3.0, 4.0)           # resolution: the save times
    after = sol.ts >= sol.overflow_time[1]
    assert np.isnan(sol.states[after, 1]).all() and np.isfinite(sol.states[~after, 1]).all()
    # in float32 it overflows earlier (3.4e38 instead of 1.8e308), and is reported too
    with pytest.warns(LESDEOverflowWarning):
        sol32 = simulate(sde, x0.float(), np.arange(0.0, 11.0), method="exact", seed=1)
    assert sol32.overflow_time[1] < sol.overflow_time[1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(field="cross_entropy"), "linear models only"),
    (dict(field=lambda x, y, t: x), "linear models only"),
    (dict(noise="sgd"), "SGD sampling noise"),
    (dict(noise="both"), "SGD sampling noise"),
    (dict(backend="torchsde"), "native sampler"),
    (dict(brownian=lambda a, b: None), "Brownian object"),
])
def test_exact_sampler_refuses_what_it_cannot_sample(kwargs, match):
    field = kwargs.pop("field", "identity")
    noise = kwargs.pop("noise", "additive")
    sde = m.LESDE(balanced_labels(3, 2), _impacts("constant"), field, sigma=0.1, noise=noise,
                  lr=0.1 if noise != "additive" else None, dim=3)
    args = dict(x0=np.zeros((6, 3)), ts=[0.0, 1.0], method="exact")
    args.update(kwargs)
    if "brownian" not in args:
        args["seed"] = 0
    with pytest.raises(ValueError, match=match):
        simulate(sde, **args)


def test_phase_sweep_with_the_exact_sampler():
    # an I-model sweep across the diagonal: the exact sampler and Euler give the same P(sep)
    # within binomial error, and the spec option is validated and round-trips
    base = dict(grid={"gap": [-0.2, 0.125, 0.4]}, beta=0.4, drift="identity", noise="additive",
                sigma=0.1, comoving=True, K=3, n=50, times=(100.0,), saves=6, replicates=64,
                chunk_size=192, lp=False)
    ex = run_sweep(PhaseSpec(seed=1, method="exact", **base))
    eu = run_sweep(PhaseSpec(seed=2, **base))
    for a, b, sa, sb in zip(ex["p_sep"], eu["p_sep"], ex["p_sep_se"], eu["p_sep_se"]):
        assert abs(a - b) <= 4.5 * max(math.sqrt(sa ** 2 + sb ** 2), 1 / 64)
    assert list(ex["p_sep"].iloc[[0, 2]]) == [0.0, 1.0]
    spec = PhaseSpec(seed=1, method="exact", **base)
    assert PhaseSpec.from_dict(spec.to_dict()) == spec
    assert "method" not in PhaseSpec(seed=1, **base).to_dict()       # old sweeps keep their digest
    with pytest.raises(ValueError, match="linear drifts"):
        PhaseSpec(grid={"alpha": [1.0]}, method="exact")              # cross-entropy, SGD noise
    with pytest.raises(ValueError, match="not of method='exact'"):
        PhaseSpec(seed=1, method="exact", increments="rademacher", **base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_sampler_on_cuda():
    y = balanced_labels(K, 50)
    sde = m.LESDE(y, _impacts("constant"), "identity", sigma=SIGMA, dim=4)
    x0 = initial_state(8, y.size, 4, seed=0, device="cuda")
    sol = simulate(sde, x0, [0.0, 1.0, 2.0], method="exact", seed=0)
    assert np.isfinite(sol.states).all() and sol.params["device"].startswith("cuda")
