"""The drift from per-class sums equals the dense N x N reference; fields; input checks."""
import numpy as np
import pytest
import torch

from lesde import model as m
from problems import balanced_labels, random_x0, unbalanced_labels


def _fields(K, p):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((K, p))
    return {
        "identity": (m.Identity(), p),
        "label_projection": (m.LabelProjection(), K),
        "cross_entropy": (m.CrossEntropy(), K),
        "readout": (m.CrossEntropyReadout(W, b=rng.standard_normal(K)), p),
        "callable": (m.CallableField(lambda x, y, t: torch.tanh(x) * (1 + t)), p),
    }


@pytest.mark.parametrize("labels", [balanced_labels(3, 5), unbalanced_labels()], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("name", ["identity", "label_projection", "cross_entropy", "readout", "callable"])
def test_drift_equals_dense_reference(labels, name):
    K, p = 3, 4
    field, dim = _fields(K, p)[name]
    E = np.random.default_rng(1).standard_normal((2, K, K))
    sde = m.LESDE(labels, m.Impacts(E), field, sigma=0.1, dim=dim)
    x = random_x0(2, labels.shape[0], dim, seed=2)
    fast = sde.drift(x, t=0.7)
    dense = sde.dense_drift(x, t=0.7)
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-13)


def test_dense_reference_is_the_formula():
    # (1/N) sum_j' E[y_j, y_j'] G(X_j') written as an explicit double loop.
    y = unbalanced_labels()
    E = np.random.default_rng(5).standard_normal((3, 3))
    sde = m.LESDE(y, m.Impacts(E), "cross_entropy")
    x = random_x0(1, y.shape[0], 3, seed=4)[0].numpy()
    G = np.eye(3)[y] - np.exp(x) / np.exp(x).sum(1, keepdims=True)
    ref = np.array([[sum(E[y[j], y[k]] * G[k, c] for k in range(len(y))) / len(y) for c in range(3)]
                    for j in range(len(y))])
    np.testing.assert_allclose(sde.drift(x), ref, atol=1e-14)


def test_field_values():
    x = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    ce = m.CrossEntropy()(x, y)
    sm = torch.softmax(x[0], -1)
    torch.testing.assert_close(ce[0], torch.eye(3, dtype=torch.float64)[y] - sm)
    lp = m.LabelProjection()(x, y)
    d = torch.eye(3, dtype=torch.float64)[y] - 1 / 3
    expect = d * ((d * x[0]).sum(-1, keepdim=True) / (d * d).sum(-1, keepdim=True))
    torch.testing.assert_close(lp[0], expect)
    # projector: P_k P_k x = P_k x
    torch.testing.assert_close(m.LabelProjection()(lp, y), lp)


def test_intra_inter_eigenvalues():
    K = 4
    E = m.Impacts.intra_inter(1.5, 0.25, K).matrix()
    ev = np.sort(np.linalg.eigvalsh(E))
    np.testing.assert_allclose(ev, [1.25, 1.25, 1.25, 1.5 + 3 * 0.25])


def test_power_law_integral():
    s = m.PowerLaw(2.0, np.array([0.5, 1.0, 1.5]), t0=3.0)
    from scipy.integrate import quad
    for i, r in enumerate([0.5, 1.0, 1.5]):
        ref = quad(lambda t: 2.0 * (1 + t / 3.0) ** (-r), 0, 7.0)[0]
        assert abs(s.integral(7.0)[i] - ref) < 1e-10
    f = m.FunctionSchedule(lambda t: 2.0 * (1 + t / 3.0) ** -0.5)
    assert abs(float(f.integral(7.0)) - float(s.integral(7.0)[0])) < 1e-9


def test_batched_impacts_and_sigma():
    y = balanced_labels(2, 3)
    sde = m.LESDE(y, m.Impacts.intra_inter(np.array([1.0, 2.0, 3.0]), 0.5, 2), "identity",
                  sigma=np.array([0.0, 0.1, 0.2]), dim=2)
    assert sde.param_batch == 3
    E = sde.impacts.matrix()
    assert E.shape == (3, 2, 2) and E[2, 0, 0] == 3.0 and E[2, 0, 1] == 0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=np.array([0, 1, 3])), "labels must lie in 0..K-1"),
    (dict(labels=np.array([0, 0, 2, 2])), "have no samples"),
    (dict(labels=np.array([[0, 1]])), "shape"),
    (dict(labels=np.array([0.5, 1.0])), "integers"),
    (dict(sigma=-1.0), "non-negative"),
    (dict(sigma=float("nan")), "finite"),
    (dict(field="nope"), "unknown drift field"),
    (dict(noise="sgd"), "learning rate"),
    (dict(noise="loud"), "noise must be one of"),
    (dict(field="cross_entropy", dim=5), "p = K"),
])
def test_bad_input(kwargs, match):
    args = dict(labels=np.array([0, 1, 2, 1]), impacts=m.Impacts.intra_inter(1.0, 0.5, 3),
                field="identity", sigma=0.1, dim=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        m.LESDE(**args)


def test_bad_impacts():
    with pytest.raises(ValueError, match="not finite"):
        m.Impacts(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        m.Impacts(np.ones((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        m.Impacts.intra_inter(np.inf, 0.0, 2)
    with pytest.raises(ValueError, match="batch"):
        m.LESDE([0, 1], m.Impacts.intra_inter(np.ones(2), np.ones(3), 2), "identity", dim=1)
    late_nan = m.Impacts.intra_inter(lambda t: 1.0 if t < 0.5 else float("nan"), 0.0, 2)
    sde = m.LESDE([0, 1], late_nan, "identity", dim=1)
    from lesde.solvers import simulate
    with pytest.raises(ValueError, match="finite"):
        simulate(sde, np.zeros((2, 1)), [0.0, 1.0], 0.1, seed=0)


def test_state_shape_checked():
    sde = m.LESDE([0, 1, 1], m.Impacts.intra_inter(1.0, 0.5, 2), "identity", dim=2)
    with pytest.raises(ValueError, match=r"\(B, N, p\)"):
        sde.drift(torch.zeros(1, 3, 3))
