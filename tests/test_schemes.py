"""Two-point (Rademacher) increments of the native Euler scheme: the bits, the exact moments of
the linear models, weak order one, SGD noise, and agreement with the Gaussian scheme on a phase
cell and a neural-collapse trajectory.

Statistical checks use fixed seeds and tolerances from the sampling distribution (as in
test_theory): means within 4.5 standard errors, variances within chi-square quantiles
1e-5 / 1 - 1e-5, two-sample differences within 4.5 combined standard errors.
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from lesde import model as m
from lesde import theory
from lesde.phase import PhaseSpec, collapse_over_time, run_sweep
from lesde.solvers import _TwoPoint, initial_state, simulate
from problems import (balanced_labels, check_gaussian_moments, check_within_class_spread,
                      class_constant_x0, random_x0, unbalanced_labels)

K, N_PER, SIGMA, R = 3, 4, 0.5, 2000


def test_two_point_signs_are_fair_independent_and_reproducible():
    M = 1_000_003                                   # not a multiple of 64: the tail is used too
    draws = _TwoPoint((M,), torch.float64, "cpu", torch.Generator().manual_seed(5))
    s = draws.draw().numpy().copy()
    assert set(np.unique(s)) == {-1.0, 1.0}
    assert abs(s.mean()) * math.sqrt(M) < 4.5       # fair: mean 0, standard error 1/sqrt(M)
    # independent: lag correlations (bits within a byte, across bytes, across 64-bit words)
    for lag in (1, 2, 7, 8, 9, 63, 64, 65):
        assert abs((s[:-lag] * s[lag:]).mean()) * math.sqrt(M - lag) < 4.5, lag
    # every byte pattern of 8 consecutive signs equally likely (chi-square, 255 dof)
    codes = ((s[: M // 8 * 8].reshape(-1, 8) > 0) * (1 << np.arange(8))).sum(1)
    counts = np.bincount(codes, minlength=256)
    stat = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert chi2.ppf(1e-5, 255) < stat < chi2.ppf(1 - 1e-5, 255)
    # a fresh draw differs; the same seed repeats
    assert (draws.draw().numpy() != s).mean() > 0.4
    again = _TwoPoint((M,), torch.float32, "cpu", torch.Generator().manual_seed(5)).draw()
    np.testing.assert_array_equal(again.numpy(), s)


def _impacts(kind, Kc=K):
    if kind == "constant":
        return m.Impacts.intra_inter(1.0, 0.3, Kc)
    return m.Impacts.intra_inter(m.PowerLaw(2.0, 0.8, t0=0.5), m.PowerLaw(0.5, 1.2, t0=0.5), Kc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model", ["I-constant", "I-power_law", "L-constant"])
def test_two_point_matches_exact_moments(model, dtype):
    # the same check as the Gaussian scheme's (test_theory), with the same tolerances
    field = "identity" if model.startswith("I") else "label_projection"
    p = 2 if field == "identity" else K
    imp = _impacts(model.split("-")[1])
    y = balanced_labels(K, N_PER)
    x0, m0 = class_constant_x0(y, p, seed=3)
    ts = np.array([0.0, 0.5, 1.0])
    sde = m.LESDE(y, imp, field, sigma=SIGMA, dim=p)
    sol = simulate(sde, torch.as_tensor(x0, dtype=dtype), ts, 0.005, num_runs=R,
                   seed=300 + (dtype == torch.float64), record="summary", increments="rademacher")
    assert sol.params["increments"] == "rademacher"
    mean, cov = theory.class_mean_moments(imp, y, field, ts, m0, sigma=SIGMA)
    for i in (1, 2):
        check_gaussian_moments(sol.class_means[i].reshape(R, -1), mean[i].ravel(), cov[i])
        check_within_class_spread(sol.within_cov[i], N_PER, SIGMA ** 2 * ts[i])


def test_two_point_batched_sigma_and_unbalanced_classes():
    # per-run sigma (B,) takes the per-run noise path, unbalanced classes the index path of the
    # layout; two parameter points x 1,500 replicates in one batch (replicate-major)
    y = unbalanced_labels()
    counts = np.bincount(y)
    sig, alphas, reps = np.array([0.2, 0.6]), np.array([1.0, 0.5]), 1500
    x0, m0 = class_constant_x0(y, 2, seed=4)
    imp = m.Impacts.intra_inter(np.tile(alphas, reps), 0.3, 3)
    sde = m.LESDE(y, imp, "identity", sigma=np.tile(sig, reps), dim=2)
    sol = simulate(sde, x0, [0.0, 0.6], 0.01, seed=2, record="summary", increments="rademacher")
    for b in range(2):
        ib = m.Impacts.intra_inter(alphas[b], 0.3, 3)
        mean, cov = theory.class_mean_moments(ib, y, "identity", [0.0, 0.6], m0, sigma=sig[b])
        check_gaussian_moments(sol.class_means[1, b::2].reshape(reps, -1), mean[1].ravel(), cov[1])
        expect = theory.within_class_moments(y, [0.0, 0.6], sigma=sig[b])[1]      # (K,)
        got = np.diagonal(sol.within_cov[1, b::2], axis1=-2, axis2=-1).mean((0, 2))
        # per class: the mean of reps * p variables sigma^2 t chi^2_{n_k - 1} / n_k
        se = expect * np.sqrt(2.0 / ((counts - 1) * reps * 2))
        assert np.all(np.abs(got - expect) < 4.5 * se), (got, expect)


def _ou_cos_two_point_euler(dt, lam=-1.0, f=2.0, T=1.0, x0=0.0):
    """E cos(f X_N) of the two-point Euler recursion X_{k+1} = (1 + lam dt) X_k + sqrt(dt) s_k,
    exactly: the characteristic function of a sum of independent signs is a product of cosines."""
    n = int(round(T / dt))
    a = 1.0 + lam * dt
    c = a ** (n - 1 - np.arange(n)) * math.sqrt(dt)
    return math.cos(f * a ** n * x0) * float(np.prod(np.cos(f * c)))


def test_two_point_weak_order_one():
    # OU: dX = -X dt + dW, X(0) = 0 (one class of one sample, E = [[-1]]): X(1) ~ N(0, v),
    # v = (1 - e^-2)/2, so E[X^2] = v and E[cos 2X] = exp(-2 v).
    sde = m.LESDE([0], m.Impacts(np.array([[-1.0]])), "identity", sigma=1.0, dim=1)
    v = (1 - math.exp(-2)) / 2
    exact = np.array([v, math.exp(-2 * v)])
    Rn = 400_000
    errs = []
    for i, dt in enumerate((0.2, 0.1, 0.05)):
        sol = simulate(sde, np.zeros((1, 1)), [0.0, 1.0], dt, num_runs=Rn, seed=40 + i,
                       record="summary", increments="rademacher")
        x = sol.class_means[-1, :, 0, 0]
        est = np.array([(x ** 2).mean(), np.cos(2 * x).mean()])
        se = np.array([(x ** 2).std() / math.sqrt(Rn), np.cos(2 * x).std() / math.sqrt(Rn)])
        # the sampler: its estimate agrees with the exact expectation of the two-point recursion
        a2 = (1 - dt) ** 2
        recursion = np.array([dt * (1 - a2 ** round(1 / dt)) / (1 - a2), _ou_cos_two_point_euler(dt)])
        assert np.all(np.abs(est - recursion) < 4.5 * se), (dt, est, recursion, se)
        errs.append(est - exact)
    errs = np.array(errs)
    # weak order one: the errors halve with dt. Errors at dt = 0.05 are 0.020 (E X^2) and 0.020
    # (E cos 2X) against standard errors of 0.0007 and 0.0011, so the ratios are measured to
    # about +-10%.
    ratios = errs[:-1] / errs[1:]
    assert np.all((ratios > 1.6) & (ratios < 2.6)), ratios


def test_two_point_sgd_noise_one_step_moments():
    # one Euler step with SGD noise: the increment's mean and covariance are those of one
    # discrete feature-SGD step (same check as the Gaussian scheme's in test_sgd_noise), and
    # its third moments vanish, as they must for weak order one.
    Y = np.array([2, 0, 1, 2, 1, 2])
    E = np.array([[1.0, 0.3, 0.2], [0.4, 1.5, 0.1], [0.2, 0.5, 0.8]])
    h = 0.3
    x0 = np.random.default_rng(0).standard_normal((6, 3))
    G = np.eye(3)[Y] - np.exp(x0) / np.exp(x0).sum(1, keepdims=True)
    moves = (h * E[Y][:, Y][:, :, None] * G[None, :, :]).transpose(1, 0, 2).reshape(6, -1)
    mean = moves.mean(0)                          # row j' of `moves`: the step at sample j'
    cov = (moves - mean).T @ (moves - mean) / 6
    sde = m.LESDE(Y, m.Impacts(E), "cross_entropy", noise="sgd", lr=h)
    Rn = 100_000
    sol = simulate(sde, x0, [0.0, h], h, num_runs=Rn, seed=1, increments="rademacher")
    inc = (sol.states[1] - sol.states[0]).reshape(Rn, -1)
    c = inc - inc.mean(0)
    se_mean = inc.std(0) / math.sqrt(Rn)
    ok = se_mean > 1e-12
    assert (np.abs(inc.mean(0) - mean)[ok] / se_mean[ok]).max() < 4.5
    prod = c[:, :, None] * c[:, None, :]
    se_cov = prod.std(0) / math.sqrt(Rn)
    okc = se_cov > 1e-12
    assert (np.abs(np.cov(inc.T) - cov)[okc] / se_cov[okc]).max() < 4.5
    assert np.abs(cov).max() > 1e-3
    third = (c[:, :6] ** 3)                        # a few coordinates' third central moments
    assert np.all(np.abs(third.mean(0)) < 4.5 * third.std(0) / math.sqrt(Rn) + 1e-15)


def test_two_point_sgd_noise_moments_equal_gaussian_scheme():
    # I-model with SGD noise (multiplicative): both schemes' iterates have the same mean and
    # covariance (they depend on the increments' first two moments only); two-sample check.
    y = balanced_labels(2, 3)
    sde = m.LESDE(y, m.Impacts.intra_inter(1.0, 0.2, 2), "identity", noise="sgd", lr=0.5, dim=2)
    x0 = random_x0(1, 6, 2, seed=3)[0]
    Rn = 4000
    a = simulate(sde, x0, [0.0, 1.0, 2.0], 0.05, num_runs=Rn, seed=5, record="summary")
    b = simulate(sde, x0, [0.0, 1.0, 2.0], 0.05, num_runs=Rn, seed=6, record="summary",
                 increments="rademacher")
    for i in (1, 2):
        xa, xb = a.class_means[i].reshape(Rn, -1), b.class_means[i].reshape(Rn, -1)
        se = np.sqrt(xa.var(0) / Rn + xb.var(0) / Rn)
        assert (np.abs(xa.mean(0) - xb.mean(0)) / se).max() < 4.5
        # variances: F = s_a^2 / s_b^2 within the two-sided 1e-5 F quantiles (near Gaussian)
        from scipy.stats import f as fdist
        ratio = xa.var(0, ddof=1) / xb.var(0, ddof=1)
        lo, hi = fdist.ppf(1e-5, Rn - 1, Rn - 1), fdist.ppf(1 - 1e-5, Rn - 1, Rn - 1)
        assert np.all((ratio > lo) & (ratio < hi)), ratio
    assert np.abs(b.class_means[2] - b.class_means[0]).max() > 0.1


def _two_sample_z(ta, tb, col):
    a, b = ta[f"{col}_mean"].to_numpy(), tb[f"{col}_mean"].to_numpy()
    se = np.sqrt(ta[f"{col}_se"].to_numpy() ** 2 + tb[f"{col}_se"].to_numpy() ** 2)
    return np.abs(a - b) / se


@pytest.mark.parametrize("case", ["imodel_additive", "ce_sgd"])
def test_phase_cell_agrees_with_gaussian_scheme(case):
    # one cell of each committed phase diagram, near its boundary so that the measures vary
    # between replicates: I-model gap 0.125 at T = 100 (P about 1/2), cross-entropy with
    # SGD noise alpha = 1, beta = 0.9 at T = 100.
    if case == "imodel_additive":
        base = dict(grid={"alpha": [0.525]}, beta=0.4, drift="identity", noise="additive", sigma=0.1,
                    comoving=True, K=3, n=50, times=(100.0,), saves=11, replicates=96, chunk_size=96)
        cols = ("ncc_accuracy", "nc1")
    else:
        base = dict(grid={"alpha": [1.0]}, beta=0.9, drift="cross_entropy", noise="sgd", lr=1.0,
                    K=3, n=30, times=(100.0,), saves=11, replicates=96, chunk_size=96)
        cols = ("loss", "accuracy", "ncc_accuracy")
    ta = run_sweep(PhaseSpec(seed=1, lp=False, **base))
    tb = run_sweep(PhaseSpec(seed=2, lp=False, increments="rademacher", **base))
    for col in cols:
        assert ta[f"{col}_se"].iloc[0] > 0                          # the measure varies
        assert _two_sample_z(ta, tb, col).max() < 4.5, col
    se = math.sqrt(ta["p_sep_se"].iloc[0] ** 2 + tb["p_sep_se"].iloc[0] ** 2)
    if case == "imodel_additive":
        assert 0.1 < ta["p_sep"].iloc[0] < 0.9                      # a cell on the boundary
    assert abs(ta["p_sep"].iloc[0] - tb["p_sep"].iloc[0]) <= 4.5 * max(se, 1 / 96)


def test_nc_trajectory_agrees_with_gaussian_scheme():
    # neural collapse over time, cross-entropy drift with SGD noise (K = 4, alpha = 1,
    # beta = 0.2, as figures/nc_ce_K4): log NC1, the ETF-angle distance and the loss at each
    # save time, two-sample z over 32 runs per scheme.
    Kc, n, Rn = 4, 15, 32
    y = np.repeat(np.arange(Kc), n)
    sde = m.LESDE(y, m.Impacts.intra_inter(1.0, 0.2, Kc), "cross_entropy", noise="sgd", lr=1.0)
    ts = np.array([0.0, 25.0, 50.0, 100.0, 200.0])
    out = {}
    for inc, seed in (("gaussian", 11), ("rademacher", 12)):
        x0 = initial_state(Rn, Kc * n, Kc, std=0.5, seed=seed)
        sol = simulate(sde, x0, ts, 0.5, seed=seed + 100, increments=inc)
        df = collapse_over_time(sol.states, y)
        df["log_nc1"] = np.log(df["nc1"])
        out[inc] = df[df["time_index"] > 0].groupby("time_index")[["log_nc1", "etf_angle", "loss"]]
    mean_a, mean_b = out["gaussian"].mean(), out["rademacher"].mean()
    se = np.sqrt(out["gaussian"].var() / Rn + out["rademacher"].var() / Rn)
    z = (np.abs(mean_a - mean_b) / se).to_numpy()
    assert z.max() < 4.5, z
    assert mean_a["log_nc1"].iloc[-1] < mean_a["log_nc1"].iloc[0] - 1.0     # it collapses


@pytest.mark.parametrize("kwargs, match", [
    (dict(increments="uniform"), "increments must be"),
    (dict(increments="rademacher", backend="torchsde"), "native Euler scheme only"),
    (dict(increments="rademacher", method="exact"), "native Euler scheme only"),
    (dict(increments="rademacher", brownian=lambda a, b: None), "Brownian object"),
    (dict(method="milstein"), "need backend='torchsde'"),
    (dict(dt=None), "dt .* is required"),
])
def test_bad_scheme_options(kwargs, match):
    sde = m.LESDE(balanced_labels(3, 2), m.Impacts.intra_inter(1.0, 0.3, 3), "identity", sigma=0.1, dim=2)
    args = dict(x0=np.zeros((6, 2)), ts=[0.0, 1.0], dt=0.1, seed=0)
    args.update(kwargs)
    if args.get("brownian") is not None:
        args.pop("seed")
    with pytest.raises(ValueError, match=match):
        simulate(sde, **args)


def test_two_point_same_seed_same_result_and_records_option():
    sde = m.LESDE(unbalanced_labels(), m.Impacts.intra_inter(1.0, 0.3, 3), "cross_entropy",
                  sigma=0.2, noise="both", lr=0.1)
    x0 = random_x0(2, sde.N, 3, seed=1)
    a = simulate(sde, x0, [0.0, 0.5, 1.0], 0.05, seed=3, increments="rademacher")
    b = simulate(sde, x0, [0.0, 0.5, 1.0], 0.05, seed=3, increments="rademacher")
    c = simulate(sde, x0, [0.0, 0.5, 1.0], 0.05, seed=3)
    np.testing.assert_array_equal(a.states, b.states)
    assert np.abs(a.states[-1] - c.states[-1]).max() > 1e-3
    assert a.params["increments"] == "rademacher" and c.params["increments"] == "gaussian"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_point_on_cuda():
    draws = _TwoPoint((1000, 77), torch.float32, "cuda", torch.Generator(device="cuda").manual_seed(0))
    s = draws.draw()
    assert s.is_cuda and set(s.unique().tolist()) == {-1.0, 1.0}
    sde = m.LESDE(balanced_labels(3, 50), m.Impacts.intra_inter(1.0, 0.3, 3), "cross_entropy",
                  sigma=0.1, noise="both", lr=0.5)
    sol = simulate(sde, initial_state(4, 150, 3, device="cuda"), [0.0, 1.0], 0.1, seed=0,
                   increments="rademacher")
    assert np.isfinite(sol.states).all() and sol.params["device"].startswith("cuda")


def test_command_line_options(tmp_path, capsys):
    from lesde import Solution
    from lesde.cli import main

    out = tmp_path / "s.npz"
    assert main(["simulate", "--K", "3", "--n", "10", "--T", "20", "--dt", "0.5", "--saves", "3",
                 "--increments", "rademacher", "--no-progress", "-o", str(out)]) == 0
    assert "two-point increments" in capsys.readouterr().out
    assert Solution.load(out).params["increments"] == "rademacher"
    assert main(["simulate", "--K", "3", "--n", "10", "--T", "20", "--saves", "3", "--drift", "identity",
                 "--noise", "additive", "--sigma", "0.1", "--method", "exact", "--no-progress",
                 "-o", str(out)]) == 0
    assert "exact sampling" in capsys.readouterr().out
    assert Solution.load(out).params["method"] == "exact"
    # a combination that cannot work is one clear line
    assert main(["simulate", "--K", "3", "--n", "5", "--method", "exact", "--no-progress", "-o", str(out)]) == 2
    assert "linear models only" in capsys.readouterr().err
    for extra in (["--method", "exact", "--drift", "identity", "--noise", "additive", "--sigma", "0.1",
                   "--comoving"], ["--increments", "rademacher"]):
        d = tmp_path / extra[1]
        assert main(["phase", "--alpha", "0.3,1", "--beta", "0.5", "--n", "10", "--times", "20",
                     "--saves", "3", "--replicates", "2", "--no-lp", "--no-progress", "-o", str(d)] + extra) == 0
        cfg = (d / "config.json").read_text()
        assert f'"{extra[0][2:]}": "{extra[1]}"' in cfg
