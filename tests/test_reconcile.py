"""Tests of lesde.reconcile against exact references: the intra/inter fit on constructed
velocities, the kernel flow against the LE-SDE's ODE when the kernel is a class-pair matrix,
the first-order drift against the NTK, and real SGD's mean first step against the drift of a
network that is linear in its parameters (where first order is exact)."""
import numpy as np
import pytest
import torch

from lesde.elasticity import empirical_ntk
from lesde.nets import MLP
from lesde.reconcile import (
    _G,
    _class_means,
    class_pair_flow,
    compare_interval,
    first_order_drift,
    intra_inter_fit,
    kernel_flow,
    sgd_interval,
)


def _toy(k=3, m=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), m)
    z = rng.normal(size=(k * m, k))
    return y, z


def test_intra_inter_fit_recovers_the_impacts():
    y, z = _toy()
    k = 3
    g = _class_means(_G(z, y, k), y, k)
    w = np.full(k, 1 / k)
    for alpha, beta in ((2.0, 0.5), (1.0, 1.0), (0.3, 1.7)):
        E = (alpha - beta) * np.eye(k) + beta
        v = E @ (w[:, None] * g)
        fit = intra_inter_fit(v, z, y, k)
        assert fit["alpha"] == pytest.approx(alpha, rel=1e-9)
        assert fit["beta"] == pytest.approx(beta, rel=1e-9)
        assert fit["contrast"] == pytest.approx(alpha - beta, abs=1e-9)
        assert fit["residual"] < 1e-12
    batch = np.stack([v, 2 * v])                     # leading batch axes
    fit = intra_inter_fit(batch, z, y, k)
    np.testing.assert_allclose(fit["alpha"], [alpha, 2 * alpha])


def test_kernel_flow_with_a_class_pair_kernel_is_the_le_sde_ode():
    """K(x_i, x_j) = E[y_i, y_j] I with self pairs included is the LE-SDE's drift
    (1/M) sum_j E G_j exactly; RK4 against Euler with dt = 1e-4 over t = 0.5 (Euler's global
    error O(dt) ~ 1e-4 relative)."""
    y, z = _toy(m=5, seed=1)
    k = 3
    E = np.array([[1.5, 0.4, 0.2], [0.3, 1.2, 0.5], [0.1, 0.6, 1.8]])
    ntk = np.einsum("ab,pq->abpq", E[y][:, y], np.eye(k))
    times = np.array([0.1, 0.5])
    zk = kernel_flow(ntk, z, y, times, include_self=True, substeps=200)
    zc = class_pair_flow(E, z, y, np.concatenate([[0.0], times]), lr=0.01, noise="none",
                         dt=1e-4)
    np.testing.assert_allclose(_class_means(zk, y, k), zc[1:], rtol=1e-3, atol=1e-6)
    # the flow's start is the drift itself
    zk0 = kernel_flow(ntk, z, y, [1e-6], include_self=True)
    d = E[y][:, y] @ _G(z, y, k) / len(y)
    np.testing.assert_allclose((zk0[0] - z) / 1e-6, d, rtol=1e-4)


def _linear_net(seed=0, k=3, d=5):
    torch.manual_seed(seed)
    return MLP(d, (), k, activation=None).double()


def test_first_order_drift_is_the_ntk_drift():
    net = _linear_net()
    rng = np.random.default_rng(2)
    x = torch.as_tensor(rng.normal(size=(12, 5)))
    y = torch.as_tensor(np.repeat(np.arange(3), 4))
    D = first_order_drift(net, x, y, x[:5])
    K = empirical_ntk(net, x[:5], x).detach().numpy()         # (5, 12, 3, 3)
    with torch.no_grad():
        G = _G(net(x).numpy(), y.numpy(), 3)
    np.testing.assert_allclose(D, np.einsum("ijab,jb->ia", K, G) / 12, rtol=1e-10,
                               atol=1e-14)


def test_sgd_mean_first_step_is_the_first_order_drift():
    """For logits linear in the parameters one SGD step at x' moves f(x) by exactly
    h K(x, x') G(x'), so E[step] / h = D; the mean over R = 4000 replicas must be within
    4.5 standard errors (per entry) of it."""
    net = _linear_net(seed=3)
    rng = np.random.default_rng(4)
    x = torch.as_tensor(rng.normal(size=(15, 5)))
    y = torch.as_tensor(np.repeat(np.arange(3), 5))
    h = 0.05
    opt = torch.optim.SGD(net.parameters(), lr=h)
    with torch.no_grad():
        z0 = net(x).numpy()
    out = sgd_interval(net, opt, x, y, x, [1], replicas=4000, seed=5)
    vel = (out[:, 0] - z0) / h                             # (R, M, q)
    D = first_order_drift(net, x, y, x)
    se = vel.std(0, ddof=1) / np.sqrt(len(vel))
    assert np.all(np.abs(vel.mean(0) - D) < 4.5 * se + 1e-12)
    with torch.no_grad():                                  # the model is left as it was
        np.testing.assert_array_equal(net(x).numpy(), z0)


def test_sgd_variants_momentum_off_and_batchnorm_eval():
    net = _linear_net(seed=6)
    rng = np.random.default_rng(7)
    x = torch.as_tensor(rng.normal(size=(9, 5)))
    y = torch.as_tensor(np.repeat(np.arange(3), 3))
    mom = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    # a momentum buffer from one earlier step
    torch.nn.functional.cross_entropy(net(x), y).backward()
    mom.step()
    mom.zero_grad()
    plain = torch.optim.SGD(net.parameters(), lr=0.1)
    a = sgd_interval(net, mom, x, y, x, [3], replicas=3, seed=1, momentum=False)
    b = sgd_interval(net, plain, x, y, x, [3], replicas=3, seed=1)
    np.testing.assert_array_equal(a, b)
    c = sgd_interval(net, mom, x, y, x, [3], replicas=3, seed=1)
    assert not np.allclose(a, c)                           # the buffer matters
    small = torch.optim.SGD(net.parameters(), lr=0.01)
    d = sgd_interval(net, plain, x, y, x, [3], replicas=3, seed=1, lr_scale=0.1)
    e = sgd_interval(net, small, x, y, x, [3], replicas=3, seed=1)
    np.testing.assert_allclose(d, e, rtol=1e-12)
    assert plain.param_groups[0]["lr"] == 0.1              # the optimizer is left as it was


def test_compare_interval_pieces_agree_where_they_must():
    torch.manual_seed(0)
    net = MLP(4, (16,), 3).double()
    rng = np.random.default_rng(8)
    x = torch.as_tensor(rng.normal(size=(30, 4)))
    y = torch.as_tensor(np.repeat(np.arange(3), 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.02)
    res = compare_interval(net, opt, x, y, x, y, [1, 4], replicas=20, sde_runs=1,
                           full_set_drift=True, n_bootstrap=50)
    # with the probe = the training set, the subset drift differs from the full-set drift only
    # by the self pairs (excluded in the former)
    v0 = res.velocity_norm["kernel@0"]
    assert abs(v0 - res.velocity_norm["full_set@0"]) < 0.3 * v0
    # over one short step the flows move at their drift at 0
    for flow, start in (("kernel_flow", "kernel@0"), ("class_pair_flow", "class_pair@0")):
        assert res.velocity_norm[flow][0] == pytest.approx(res.velocity_norm[start], rel=0.05)
    assert np.isfinite(res.alpha_hat) and res.E_hat.shape == (3, 3)
    d = res.decomposition(4, quantity="contrast")
    assert d["total"] == pytest.approx(d["form"] * d["time_scale"] * d["rest"], rel=1e-9)
    assert d["subset"] == pytest.approx(d["kernel@0"] / d["full_set@0"])
    rows = res.rows()
    assert {r["velocity"] for r in rows} == {"kernel@0", "class_pair@0", "full_set@0",
                                             "kernel_flow", "class_pair_flow", "sgd"}
    with pytest.raises(ValueError, match="no interval"):
        res.decomposition(3)
    # the rows (as the CSV holds them) give back the same decomposition
    back = type(res).from_rows([{k: str(v) for k, v in r.items()} for r in rows], lr=res.lr,
                               alpha_hat=res.alpha_hat, beta_hat=res.beta_hat, E_hat=res.E_hat)
    d2 = back.decomposition(4, quantity="contrast")
    for key in ("total", "form", "time_scale", "rest", "sgd_lo"):
        assert d2[key] == pytest.approx(d[key], rel=1e-9)
