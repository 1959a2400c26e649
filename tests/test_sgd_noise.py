"""SGD sampling noise: the SDE's increment covariance equals one discrete SGD step's, the SDE
approximates discrete feature SGD to O(h), and the noise vanishes with the gradients."""
import numpy as np
import pytest
import torch

from lesde import model as m
from lesde.solvers import simulate, simulate_feature_sgd

Y = np.array([2, 0, 1, 2, 1, 2])           # class sizes 1, 2, 3
E = np.array([[1.0, 0.3, 0.2], [0.4, 1.5, 0.1], [0.2, 0.5, 0.8]])


def _exact_step_moments(x0, h):
    """Mean and covariance of one discrete step's increment, the slow obvious way:
    a step at j' (prob. 1/N) moves X_j by h E[y_j, y_j'] G_j'."""
    N, p = x0.shape
    G = np.eye(3)[Y] - np.exp(x0) / np.exp(x0).sum(1, keepdims=True)
    moves = np.zeros((N, N * p))                # row j': the whole increment vector
    for jp in range(N):
        for j in range(N):
            for c in range(p):
                moves[jp, j * p + c] = h * E[Y[j], Y[jp]] * G[jp, c]
    mean = moves.mean(0)
    cov = sum(np.outer(v, v) for v in moves) / N - np.outer(mean, mean)
    return mean, cov


def _z(sample_mean, mean, se):
    ok = se > 1e-12
    return np.abs(sample_mean - mean)[ok] / se[ok]


def test_one_step_covariance_equals_discrete_step():
    h = 0.3
    x0 = np.random.default_rng(0).standard_normal((6, 3))
    mean, cov = _exact_step_moments(x0, h)
    sde = m.LESDE(Y, m.Impacts(E), "cross_entropy", noise="sgd", lr=h)
    Rn = 100_000
    sol = simulate(sde, x0, [0.0, h], h, num_runs=Rn, seed=1, draw_dtype=torch.float64)
    inc = (sol.states[1] - sol.states[0]).reshape(Rn, -1)
    se_mean = np.sqrt(np.diag(cov) / Rn)
    assert _z(inc.mean(0), mean, se_mean).max() < 4.5
    scov = np.cov(inc.T)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / Rn)  # Gaussian increments
    assert _z(scov, cov, se_cov).max() < 4.5
    assert np.abs(cov).max() > 1e-3  # a real, non-trivial covariance (correlated across samples)
    # the discrete process itself (non-Gaussian: standard errors from the sample)
    disc = simulate_feature_sgd(sde, x0, [0.0, h], num_runs=Rn, seed=2)
    dinc = (disc.states[1] - disc.states[0]).reshape(Rn, -1)
    c = dinc - dinc.mean(0)
    prod = c[:, :, None] * c[:, None, :]
    se_d = prod.std(0) / np.sqrt(Rn)
    assert _z(np.cov(dinc.T), cov, se_d).max() < 4.5


def _imodel_pair(h):
    y = np.array([0, 0, 1, 1])
    return y, m.LESDE(y, m.Impacts.intra_inter(1.0, 0.2, 2), "identity", noise="sgd", lr=h, dim=1)


def test_feature_sgd_approaches_sde_at_order_h():
    x0 = np.array([[1.0], [0.6], [-0.5], [-0.3]])
    Rn = 40_000
    mean_err, var_err = [], []
    for i, h in enumerate((0.4, 0.2, 0.1)):
        _, sde = _imodel_pair(h)
        d = simulate_feature_sgd(sde, x0, [0.0, 1.2], num_runs=Rn, seed=10 + i, record="summary")
        s = simulate(sde, x0, [0.0, 1.2], 0.01, num_runs=Rn, seed=20 + i, record="summary",
                     draw_dtype=torch.float64)
        md, ms = d.class_means[-1, :, :, 0], s.class_means[-1, :, :, 0]
        mean_err.append(np.abs(md.mean(0) - ms.mean(0)).max())
        var_err.append(np.abs(md.var(0) / ms.var(0) - 1).max())
    # Measured: mean error 0.07 -> 0.03 -> 0.015 (Monte Carlo SE about 0.002), relative variance
    # error 0.4 -> 0.2 -> 0.1 (SE about 0.01): each halving of h roughly halves both.
    for errs in (mean_err, var_err):
        r = np.array(errs[:-1]) / np.array(errs[1:])
        assert np.all((r > 1.4) & (r < 2.8)), errs
    assert var_err[-1] < 0.2


@pytest.mark.parametrize("noise", ["sgd", "additive"])
def test_noise_vanishes_with_the_gradient(noise):
    # identity field at X = 0: G = 0, so the SGD noise (but not additive noise) is zero
    y = np.array([0, 1, 1, 0])
    sde = m.LESDE(y, m.Impacts.intra_inter(1.0, 0.3, 2), "identity", noise=noise, lr=0.1, sigma=0.5, dim=2)
    sol = simulate(sde, np.zeros((4, 2)), [0.0, 0.5, 1.0], 0.01, num_runs=3, seed=0)
    disc = simulate_feature_sgd(sde, np.zeros((4, 2)), [0.0, 0.5, 1.0], num_runs=3, seed=0)
    if noise == "sgd":
        assert np.all(sol.states == 0) and np.all(disc.states == 0)
    else:
        assert np.abs(sol.states[-1]).min() > 0
    # a zero read-out: G = W^T (...) = 0 from any state
    sde0 = m.LESDE(y, m.Impacts.intra_inter(1.0, 0.3, 2), m.CrossEntropyReadout(np.zeros((2, 3))),
                   noise="sgd", lr=0.1)
    x0 = np.random.default_rng(0).standard_normal((4, 3))
    sol0 = simulate(sde0, x0, [0.0, 1.0], 0.01, num_runs=2, seed=0)
    np.testing.assert_array_equal(sol0.states[-1], sol0.states[0])


def test_sgd_noise_is_class_rigid():
    # E depends on labels only, so all samples of a class receive the same increment: the
    # within-class spread never changes under SGD noise alone (a property of the model).
    sde = m.LESDE(Y, m.Impacts(E), "cross_entropy", noise="sgd", lr=0.5)
    x0 = np.random.default_rng(1).standard_normal((6, 3))
    sol = simulate(sde, x0, [0.0, 2.0], 0.05, num_runs=4, seed=0)
    np.testing.assert_allclose(sol.within_cov[-1], sol.within_cov[0], atol=1e-10)


def test_minibatch_feature_sgd_mean_step():
    # mean move per step is h * drift for any batch size: average over many runs of one step
    h = 0.2
    x0 = np.random.default_rng(3).standard_normal((6, 3))
    sde = m.LESDE(Y, m.Impacts(E), "cross_entropy", noise="sgd", lr=h)
    mean, cov = _exact_step_moments(x0, h)
    for b in (1, 3, 6):
        d = simulate_feature_sgd(sde, x0, [0.0, h], num_runs=20_000, seed=b, batch_size=b)
        inc = (d.states[1] - d.states[0]).reshape(20_000, -1)
        if b == 6:  # the full batch is deterministic: exactly h * drift
            np.testing.assert_allclose(inc, np.broadcast_to(mean, inc.shape), atol=1e-12)
        else:
            se = inc.std(0) / np.sqrt(20_000)
            assert _z(inc.mean(0), mean, se).max() < 4.5


def test_feature_sgd_bad_input():
    sde = m.LESDE(Y, m.Impacts(E), "cross_entropy", noise="sgd", lr=0.1)
    x0 = np.zeros((6, 3))
    with pytest.raises(ValueError, match="step grid"):
        simulate_feature_sgd(sde, x0, [0.0, 0.15])
    with pytest.raises(ValueError, match="batch_size"):
        simulate_feature_sgd(sde, x0, [0.0, 0.1], batch_size=7)
    sde_add = m.LESDE(Y, m.Impacts(E), "cross_entropy", sigma=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        simulate_feature_sgd(sde_add, x0, [0.0, 0.1])
