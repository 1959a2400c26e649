"""Exact linear theory: closed forms vs moment ODEs, and the simulator against both.

Statistical checks use fixed seeds and tolerances derived from the sampling distribution:
sample means within 4.5 standard errors (sigma known from theory), sample variances within
the 1e-5 / 1 - 1e-5 quantiles of the chi-square law (R - 1) s^2 / sigma^2 ~ chi^2_{R-1}.
"""
import numpy as np
import pytest
import torch
from scipy.stats import chi2

from lesde import model as m
from lesde import theory
from lesde.solvers import simulate
from problems import balanced_labels, check_gaussian_moments, class_constant_x0

K, N_PER, SIGMA = 3, 4, 0.5
R = 2000  # paths


def _impacts(kind):
    if kind == "constant":
        return m.Impacts.intra_inter(1.0, 0.3, K)
    return m.Impacts.intra_inter(m.PowerLaw(2.0, 0.8, t0=0.5), m.PowerLaw(0.5, 1.2, t0=0.5), K)


@pytest.mark.parametrize("kind", ["constant", "power_law"])
def test_imodel_closed_form_equals_moment_ode(kind):
    imp = _impacts(kind)
    y = balanced_labels(K, N_PER)
    m0 = np.random.default_rng(0).standard_normal((K, 2))
    ts = np.array([0.0, 0.5, 1.3, 2.0])
    mean, cov = theory.class_mean_moments(imp, y, "identity", ts, m0, sigma=SIGMA)
    cf = theory.imodel_modes(imp, N_PER, ts, sigma=SIGMA)
    g = m0.mean(0)
    expect = cf["grand_growth"][:, None, None] * g + cf["centred_growth"][:, None, None] * (m0 - g)
    np.testing.assert_allclose(mean, expect, rtol=1e-8)
    # cov of vec(Xbar) (class-major) = closed-form (K x K) per coordinate, coordinates independent
    np.testing.assert_allclose(cov, np.stack([np.kron(c, np.eye(2)) for c in cf["cov"]]), atol=1e-9)


def test_imodel_constant_growth_rates():
    imp = m.Impacts.intra_inter(1.0, 0.3, K)
    cf = theory.imodel_modes(imp, N_PER, [2.0])
    assert np.isclose(cf["grand_growth"][0], np.exp(2.0 * (1.0 + 2 * 0.3) / 3))
    assert np.isclose(cf["centred_growth"][0], np.exp(2.0 * (1.0 - 0.3) / 3))


@pytest.mark.parametrize("kind", ["constant", "power_law"])
@pytest.mark.parametrize("Kl", [3, 4])
def test_lmodel_modes_equal_moment_ode(kind, Kl):
    imp = (m.Impacts.intra_inter(1.0, 0.3, Kl) if kind == "constant" else
           m.Impacts.intra_inter(m.PowerLaw(2.0, 0.8, 0.5), m.PowerLaw(0.5, 1.2, 0.5), Kl))
    y = balanced_labels(Kl, 3)
    m0 = np.random.default_rng(1).standard_normal((Kl, Kl))
    ts = np.array([0.0, 0.7, 1.5])
    mean, _ = theory.class_mean_moments(imp, y, "label_projection", ts, m0)
    d = np.eye(Kl) - 1.0 / Kl
    yk = np.einsum("kc,tkc->tk", d, mean) / (1 - 1 / Kl)
    ybar = yk.mean(1)
    cf = theory.lmodel_modes(imp, ts)
    np.testing.assert_allclose(ybar / ybar[0], cf["symmetric"], rtol=1e-8)
    np.testing.assert_allclose((yk - ybar[:, None]) / (yk[0] - ybar[0]), cf["antisymmetric"][:, None] * np.ones(Kl), rtol=1e-7)


@pytest.mark.parametrize("backend", ["native", "torchsde"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model", ["I-constant", "I-power_law", "L-constant"])
def test_simulation_matches_exact_moments(model, dtype, backend):
    field = "identity" if model.startswith("I") else "label_projection"
    p = 2 if field == "identity" else K
    imp = _impacts(model.split("-")[1])
    y = balanced_labels(K, N_PER)
    x0, m0 = class_constant_x0(y, p, seed=3)
    ts = np.array([0.0, 0.5, 1.0])
    sde = m.LESDE(y, imp, field, sigma=SIGMA, dim=p)
    # dt = 0.005: Euler's O(dt) bias is below 0.15 standard errors here
    seed = 100 + 10 * ["native", "torchsde"].index(backend) + (dtype == torch.float64)
    sol = simulate(sde, torch.as_tensor(x0, dtype=dtype), ts, 0.005, backend=backend, num_runs=R,
                   seed=seed, record="summary")
    mean, cov = theory.class_mean_moments(imp, y, field, ts, m0, sigma=SIGMA)
    for i in (1, 2):
        check_gaussian_moments(sol.class_means[i].reshape(R, -1), mean[i].ravel(), cov[i])
    # within-class: started with no spread, (n/(sigma^2 t)) * within_cov[k, a, a] ~ chi^2_{n-1},
    # independent over runs, classes and coordinates.
    for i in (1, 2):
        t = ts[i]
        diag = np.diagonal(sol.within_cov[i], axis1=-2, axis2=-1)       # (R, K, p)
        stat = (N_PER / (SIGMA ** 2 * t)) * diag.sum()
        dof = R * K * p * (N_PER - 1)
        assert chi2.ppf(1e-5, dof) < stat < chi2.ppf(1 - 1e-5, dof)
        expect = theory.within_class_moments(y, ts, sigma=SIGMA)[i]
        assert np.allclose(diag.mean((0, 2)), expect, rtol=0.05)


def test_euler_maruyama_weak_order_one():
    # dX = X dt + dW, X(0) = 1 (one class, one sample): E[X(1)] = e, E[X(1)^2] = e^2 + (e^2 - 1)/2.
    sde = m.LESDE([0], m.Impacts(np.array([[1.0]])), "identity", sigma=1.0, dim=1)
    exact = np.array([np.e, np.e ** 2 + (np.e ** 2 - 1) / 2])
    errs = []
    for dt in (0.2, 0.1, 0.05):
        sol = simulate(sde, np.ones((1, 1)), [0.0, 1.0], dt, num_runs=400_000, seed=7,
                       record="summary", draw_dtype=torch.float64)
        x = sol.class_means[-1, :, 0, 0]
        errs.append(exact - np.array([x.mean(), (x ** 2).mean()]))
    errs = np.array(errs)
    # Standard errors: 1.79/sqrt(4e5) = 0.003 (mean), about 0.017 (second moment); the errors
    # are 0.23..0.065 and 2.5..0.8, so the ratios below are measured to about +-10%.
    ratios = errs[:-1] / errs[1:]
    assert np.all((ratios > 1.6) & (ratios < 2.4)), ratios


def test_theory_bad_input():
    imp = m.Impacts.intra_inter(1.0, 0.3, 3)
    with pytest.raises(ValueError, match="no samples"):
        theory.class_mean_moments(imp, np.array([0, 0, 1]), "identity", [0, 1], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="linear fields"):
        theory.class_mean_moments(imp, balanced_labels(3, 2), "cross_entropy", [0, 1], np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"m0 must have shape"):
        theory.class_mean_moments(imp, balanced_labels(3, 2), "identity", [0, 1], np.zeros((2, 2)))


@pytest.mark.parametrize("field", ["identity", "label_projection"])
def test_euler_rates_are_the_recursion_growth(field):
    # the Euler recursion m_{k+1} = (I + dt C) m_k on exact class means, read off by the modes
    K, dt, steps, alpha, beta = 3, 0.05, 40, 1.2, 0.4
    imp = m.Impacts.intra_inter(alpha, beta, K)
    y = balanced_labels(K, 2)
    p = 2 if field == "identity" else K
    C = theory.drift_matrix(imp, np.bincount(y), field, p, 0.0)
    m0 = np.random.default_rng(4).standard_normal((K, p))
    mt = np.linalg.matrix_power(np.eye(K * p) + dt * C, steps) @ m0.ravel()
    a, b = theory.euler_rates(alpha, beta, K, dt, field)
    eff = m.Impacts.intra_inter(a, b, K)
    expect, _ = theory.class_mean_moments(eff, y, field, [0.0, dt * steps], m0)
    got, want = mt.reshape(K, p), expect[-1]
    if field == "label_projection":  # the label coordinates y_k are the modes; the rest follows them
        d = np.eye(K) - 1.0 / K
        got, want = (d * got).sum(1), (d * want).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-8)
