"""Tests of lesde.metrics against exact answers and slow, obvious reference implementations."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

from lesde import metrics as lm

# --------------------------------------------------------------------------------------------
# helpers: data sets and slow references (loops over samples and classes, on purpose)
# --------------------------------------------------------------------------------------------
SIZES = [7, 13, 4, 9]  # unbalanced classes, K = 4


def unbalanced(seed, batch=(), p=5, sizes=SIZES, spread=1.5):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
    y = y[rng.permutation(y.size)]
    centres = spread * rng.normal(size=batch + (len(sizes), p))
    X = centres[..., y, :] + rng.normal(size=batch + (y.size, p))
    return X, y


def simplex_etf(k, p, r, seed=0):
    """K class means forming a simplex ETF of norm r, rotated into R^p (p >= K)."""
    E = np.eye(k) - 1.0 / k
    E *= r / np.linalg.norm(E, axis=1, keepdims=True)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(p, p)))
    return E @ Q[:k]  # (K, p); rows orthonormally embedded


def ref_means(X, y, k):
    return [np.mean([X[j] for j in range(len(y)) if y[j] == c], axis=0) for c in range(k)]


def ref_ncc(X, y, k):
    mus = {c: m for c, m in enumerate(ref_means(X, y, k)) if np.any(y == c)}
    good = 0
    for j in range(len(y)):
        d = {c: np.linalg.norm(X[j] - m) for c, m in mus.items()}
        good += all(d[y[j]] < d[c] for c in d if c != y[j])
    return good / len(y)


def ref_ce(Z, y):
    total = 0.0
    for j in range(len(y)):
        m = max(Z[j])
        total += m + math.log(sum(math.exp(z - m) for z in Z[j])) - Z[j][y[j]]
    return total / len(y)


def ref_covariances(X, y, k):
    mus = ref_means(X, y, k)
    mu_g = sum(mus) / k
    p = X.shape[1]
    Sw = np.zeros((p, p))
    for c in range(k):
        idx = [j for j in range(len(y)) if y[j] == c]
        for j in idx:
            Sw += np.outer(X[j] - mus[c], X[j] - mus[c]) / (len(idx) * k)
    Sb = sum(np.outer(m - mu_g, m - mu_g) for m in mus) / k
    return Sw, Sb, np.stack([m - mu_g for m in mus], axis=1)


def ref_nc1(X, y, k):
    Sw, Sb, _ = ref_covariances(X, y, k)
    return np.trace(Sw @ np.linalg.pinv(Sb, rcond=1e-10)) / k


def ref_nc2(X, y, k):
    _, _, M = ref_covariances(X, y, k)
    norms = [np.linalg.norm(M[:, c]) for c in range(k)]
    cos = [M[:, a] @ M[:, c] / (norms[a] * norms[c]) for a in range(k) for c in range(a + 1, k)]
    return np.std(norms) / np.mean(norms), np.std(cos), np.mean([abs(c + 1 / (k - 1)) for c in cos])


def ref_nc3(X, y, k, W):
    _, _, M = ref_covariances(X, y, k)
    return np.sum((W.T / np.linalg.norm(W) - M / np.linalg.norm(M)) ** 2)


def ref_nc4(X, y, k, W, b):
    mus = ref_means(X, y, k)
    bad = 0
    for j in range(len(y)):
        pred = int(np.argmax(W @ X[j] + b))
        near = int(np.argmin([np.linalg.norm(X[j] - m) for m in mus]))
        bad += pred != near
    return bad / len(y)


def ref_feasible(X, y, k):
    """Feasibility with margin 1 (no objective), a dense LP built row by row."""
    n, p = X.shape
    rows = []
    for j in range(n):
        for c in range(k):
            if c == y[j]:
                continue
            row = np.zeros(k * (p + 1))
            row[c * p : (c + 1) * p] += X[j]
            row[y[j] * p : (y[j] + 1) * p] -= X[j]
            row[k * p + c] += 1.0
            row[k * p + y[j]] -= 1.0
            rows.append(row)
    res = linprog(np.zeros(k * (p + 1)), A_ub=np.array(rows), b_ub=-np.ones(len(rows)),
                  bounds=[(None, None)] * (k * (p + 1)), method="highs")
    assert res.status in (0, 2)
    return res.status == 0


def achieved_margin(X, y, W, b):
    scores = X @ W.T + b
    own = scores[np.arange(len(y)), y]
    scores[np.arange(len(y)), y] = -np.inf
    return np.min(own - scores.max(axis=1))


# --------------------------------------------------------------------------------------------
# linear separability
# --------------------------------------------------------------------------------------------
def test_xor_is_not_separable():
    X = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    res = lm.linear_separability(X, np.array([0, 0, 1, 1]))
    assert res.separable is False and res.margin == 0.0 and res.W is None


def test_duplicates_with_different_labels_are_not_separable():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 3)) + 10 * np.repeat(np.eye(3)[:2], 10, axis=0)
    y = np.repeat([0, 1], 10)
    assert lm.linear_separability(X, y).separable  # well separated ...
    X2, y2 = np.vstack([X, X[3]]), np.append(y, 1)  # ... until a copy of a class-0 point is class 1
    assert not lm.linear_separability(X2, y2).separable
    assert not lm.linear_separability(np.ones((5, 2)), np.array([0, 1, 2, 0, 1])).separable


def test_shifted_gaussians_separable_and_classifier_achieves_margin():
    rng = np.random.default_rng(2)
    k, n, p = 3, 40, 4
    y = np.repeat(np.arange(k), n)
    X = rng.normal(size=(k * n, p)) + 20.0 * np.eye(k, p)[y]  # gap >> spread
    res = lm.linear_separability(X, y)
    assert res.separable and res.margin > 1.0
    assert achieved_margin(X, y, res.W, res.b) >= 1 - 1e-9
    assert np.max(np.abs(res.W)) == pytest.approx(1 / res.margin, rel=1e-9)


def test_three_classes_on_a_line_exact_margin():
    # Affine multi-class classifiers separate intervals of a line (the argmax regions are
    # convex), even though the middle class is not separable from the rest by one hyperplane.
    # With points -2, 0, 2 and |w_k| <= 1: t <= w1 - w0 and t <= w2 - w1, so 2t <= w2 - w0 <= 2,
    # t* = 1 attained by w = (-1, 0, 1), b = (0, 1, 0).
    X, y = np.array([[-2.0], [0.0], [2.0]]), np.array([0, 1, 2])
    res = lm.linear_separability(X, y)
    assert res.separable and res.margin == pytest.approx(1.0, abs=1e-8)
    assert achieved_margin(X, y, res.W, res.b) >= 1 - 1e-9
    # the margin is translation invariant and scales with X
    assert lm.linear_separability(3 * X + 7, y).margin == pytest.approx(3.0, abs=1e-7)
    # a cloud of points on the line, middle class in between
    rng = np.random.default_rng(3)
    t = np.concatenate([rng.uniform(-3, -1, 20), rng.uniform(-0.5, 0.5, 20), rng.uniform(1, 3, 20)])
    Xl = np.outer(t, [1.0, 2.0])  # on a line in R^2
    yl = np.repeat([0, 1, 2], 20)
    res = lm.linear_separability(Xl, yl)
    assert res.separable and achieved_margin(Xl, yl, res.W, res.b) >= 1 - 1e-9


def test_two_points_margin_is_l1_distance():
    # max (w1 - w0).(x1 - x0) over |w|_inf <= 1 is 2 |x1 - x0|_1 and must equal 2t.
    x = np.array([[0.3, -1.0, 2.0], [1.0, 0.5, 1.0]])
    res = lm.linear_separability(x, np.array([0, 1]))
    assert res.margin == pytest.approx(np.abs(x[1] - x[0]).sum(), abs=1e-7)


def test_degenerate_classes():
    # a class with one point, K = 2, an empty class, and a single present class
    X = np.array([[0.0, 0.0], [1.0, 2.0], [5.0, 2.0]])
    res = lm.linear_separability(X, np.array([0, 1, 1]), num_classes=4)
    assert res.separable and res.W.shape == (4, 2)
    assert achieved_margin(X, np.array([0, 1, 1]), res.W, res.b) >= 1 - 1e-9
    one = lm.linear_separability(X, np.array([2, 2, 2]), num_classes=3)
    assert one.separable and one.margin == np.inf
    assert achieved_margin(X, np.array([2, 2, 2]), one.W, one.b) >= 1


@pytest.mark.parametrize("seed", range(8))
def test_separability_agrees_with_feasibility_lp(seed):
    rng = np.random.default_rng(seed)
    n, k, p = 12, 3, 2
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, p)) + (seed % 4) * np.eye(k, p)[y]  # from mixed to separated
    res = lm.linear_separability(X, y, num_classes=k)
    assert res.separable == ref_feasible(X, y, k)
    if res.separable:
        assert achieved_margin(X, y, res.W, res.b) >= 1 - 1e-9


def test_separability_batched_matches_items_and_torch():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1, 2], 6)
    X = rng.normal(size=(2, 3, 18, 2)) + rng.uniform(0, 6, size=(2, 3, 1, 1)) * np.eye(3, 2)[y]
    X[0, 1, 4] = np.nan
    res = lm.linear_separability(torch.tensor(X), torch.tensor(y))
    assert res.separable.shape == res.margin.shape == (2, 3) and res.W.shape == (2, 3, 3, 2)
    assert not res.separable[0, 1] and np.isnan(res.margin[0, 1])
    for i in range(2):
        for j in range(3):
            if (i, j) == (0, 1):
                continue
            one = lm.linear_separability(X[i, j], y)
            assert one.separable == res.separable[i, j]
            assert one.margin == pytest.approx(res.margin[i, j], abs=1e-9)
    assert res.separable.any() and not res.separable.all()


# --------------------------------------------------------------------------------------------
# cheap proxies
# --------------------------------------------------------------------------------------------
def test_proxies_match_references_unbalanced_and_batched():
    X, y = unbalanced(10, batch=(2, 3), p=4)
    k = len(SIZES)
    rng = np.random.default_rng(11)
    W, b = rng.normal(size=(k, 4)), rng.normal(size=k)
    ncc = lm.ncc_accuracy(X, y)
    amax = lm.argmax_accuracy(X, y)
    ce = lm.cross_entropy(torch.tensor(X, dtype=torch.float64), y)
    ce_w = lm.cross_entropy(X, y, W, b)
    acc_w = lm.argmax_accuracy(X, y, W, b)
    for out in (ncc, amax, ce, ce_w, acc_w):
        assert isinstance(out, np.ndarray) and out.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            x = X[i, j]
            assert ncc[i, j] == ref_ncc(x, y, k)
            assert amax[i, j] == np.mean([np.argmax(x[n]) == y[n] for n in range(len(y))])
            assert ce[i, j] == pytest.approx(ref_ce(x, y), rel=1e-12)
            assert ce_w[i, j] == pytest.approx(ref_ce(x @ W.T + b, y), rel=1e-12)
            assert acc_w[i, j] == np.mean([np.argmax(W @ x[n] + b) == y[n] for n in range(len(y))])
            assert lm.ncc_accuracy(x, y) == ncc[i, j]  # unbatched gives a float
            assert isinstance(lm.cross_entropy(x, y), float)


def test_ncc_ignores_empty_class_and_ties_are_errors():
    X, y = unbalanced(12, p=3)
    assert lm.ncc_accuracy(X, y, num_classes=6) == ref_ncc(X, y, 4)
    # identical features: no sample is strictly nearest to its own centre or strictly argmax
    Z = np.zeros((10, 3))
    yz = np.arange(10) % 3
    assert lm.ncc_accuracy(Z, yz) == 0.0 and lm.argmax_accuracy(Z, yz) == 0.0
    assert lm.cross_entropy(Z, yz) == pytest.approx(math.log(3), rel=1e-14)


def test_cross_entropy_is_stable_for_huge_logits():
    Z = np.array([[1000.0, 0.0, 0.0], [1000.0, 0.0, 0.0], [-800.0, 500.0, 499.0]])
    y = np.array([0, 1, 2])
    exact = [
        2 * math.exp(-1000),
        1000 + math.log1p(2 * math.exp(-1000)),
        1 + math.log1p(math.exp(-1) + math.exp(-1300)),
    ]
    assert lm.cross_entropy(Z, y) == pytest.approx(np.mean(exact), rel=1e-14)


def _ref_probe(X, y, k, l2):
    """The probe objective minimised by L-BFGS from scipy, with its analytic gradient."""
    n, p = X.shape
    Y = np.eye(k)[y]

    def fun(theta):
        W, b = theta[: k * p].reshape(k, p), theta[k * p :]
        Z = X @ W.T + b
        m = Z.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(Z - m).sum(axis=1))
        S = np.exp(Z - lse[:, None])
        f = np.mean(lse - (Z * Y).sum(axis=1)) + 0.5 * l2 * np.sum(W**2)
        gW = (S - Y).T @ X / n + l2 * W
        gb = (S - Y).mean(axis=0)
        return f, np.concatenate([gW.ravel(), gb])

    res = minimize(fun, np.zeros(k * (p + 1)), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-13, "ftol": 1e-16, "maxiter": 20000, "maxcor": 30})
    W, b = res.x[: k * p].reshape(k, p), res.x[k * p :]
    return ref_ce(X @ W.T + b, y)


@pytest.mark.parametrize("l2,spread", [(1e-1, 1.0), (1e-3, 1.0), (1e-3, 6.0)])
def test_linear_probe_matches_scipy_optimum(l2, spread):
    X, y = unbalanced(20, batch=(2,), p=3, spread=spread)  # spread 6: (nearly) separable
    out = lm.linear_probe_loss(X, y, l2=l2)
    assert out.shape == (2,)
    for i in range(2):
        assert out[i] == pytest.approx(_ref_probe(X[i], y, 4, l2), abs=2e-6)


def test_linear_probe_separable_and_empty_classes():
    rng = np.random.default_rng(21)
    y = np.repeat([0, 2], 30)  # class 1 is empty
    X = rng.normal(size=(60, 2)) + 8.0 * (y[:, None] == 2)
    loss = lm.linear_probe_loss(X, y, l2=1e-3, num_classes=3)
    assert 0 < loss < 0.05
    assert loss == pytest.approx(lm.linear_probe_loss(X, (y > 0).astype(int), l2=1e-3), rel=1e-8)
    # farther apart -> smaller loss at the same l2
    assert lm.linear_probe_loss(3 * X, y, l2=1e-3) < loss


# --------------------------------------------------------------------------------------------
# neural collapse
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,p", [(2, 2), (3, 3), (4, 7), (5, 5)])
def test_exact_simplex_etf_collapse(k, p):
    mus = simplex_etf(k, p, r=2.5, seed=k)
    y = np.repeat(np.arange(k), [3, 1, 2, 4, 2][:k])
    X = mus[y] + np.array([0.7, -1.0, 0.2, 0.0, 0.0, 0.0, 0.0][:p])  # a global shift
    W = 3.0 * mus  # self-dual read-out
    res = lm.neural_collapse(X, y, W=W)
    assert abs(res.nc1) < 1e-10
    for term in (res.equinorm, res.equiangularity, res.etf_angle):
        assert abs(term) < 1e-10
    assert abs(res.nc3) < 1e-10 and res.nc4 == 0.0


def test_identity_readout_of_etf_logits():
    k = 3
    mus = 2.0 * (np.eye(k) - 1.0 / k)  # logits along d_k = e_k - 1/K
    y = np.arange(k).repeat(5)
    res = lm.neural_collapse(mus[y], y, W=np.eye(k), center_W=True)
    assert abs(res.nc3) < 1e-12 and res.nc4 == 0.0
    # the uncentred identity is not self-dual with centred means (Papyan's definition)
    assert lm.nc3(mus[y], y, np.eye(k)) > 0.1


def test_nc1_closed_form_by_simulation():
    # Simplex-ETF means of norm r (spanning a (K-1)-dim subspace) with noise s^2 I:
    # Sigma_B = r^2/(K-1) P, Sigma_B^+ = (K-1)/r^2 P, so NC1 = Tr(P Sigma_W) (K-1)/(K r^2)
    # = s^2 (K-1)^2 / (K r^2). With 1/n_k normalisation E[Sigma_W] = s^2 (1 - K/N) I, exactly
    # for fixed means; estimating Sigma_B from noisy means adds an O(s^2/(n r^2)) bias, about 1e-4
    # relative here, negligible against the standard error (~0.6 %). The standard error is taken
    # from the spread over R independent runs (batched), checked against the chi-square value
    # SE ~ NC1 sqrt(2 / ((K-1)(N-K))) per run.
    k, n, p, r, s, R = 3, 500, 5, 2.0, 0.5, 20
    y = np.repeat(np.arange(k), n)
    N = k * n
    mus = simplex_etf(k, p, r, seed=7)
    X = mus[y] + s * np.random.default_rng(8).normal(size=(R, N, p))
    values = lm.nc1(X, y)
    assert values.shape == (R,)
    expected = s**2 * (k - 1) ** 2 / (k * r**2) * (N - k) / N
    se = values.std(ddof=1) / math.sqrt(R)
    assert abs(values.mean() - expected) < 4 * se
    chi2_sd = expected * math.sqrt(2 / ((k - 1) * (N - k)))
    assert 0.5 < values.std(ddof=1) / chi2_sd < 2.0
    assert lm.nc1(mus[y], y) == pytest.approx(0.0, abs=1e-12)  # no within-class noise


def test_nc_metrics_match_references_unbalanced_and_batched():
    X, y = unbalanced(30, batch=(2, 2), p=5)
    k = len(SIZES)
    rng = np.random.default_rng(31)
    W = rng.normal(size=(2, 1, k, 5))  # one read-out per leading index, broadcast over the second
    b = rng.normal(size=k)
    res = lm.neural_collapse(torch.tensor(X), torch.tensor(y), W=W, b=b)
    for name in ("nc1", "equinorm", "equiangularity", "etf_angle", "nc3", "nc4"):
        assert getattr(res, name).shape == (2, 2)
    two = lm.nc2(X, y)
    for i in range(2):
        for j in range(2):
            x, w = X[i, j], W[i, 0]
            assert res.nc1[i, j] == pytest.approx(ref_nc1(x, y, k), rel=1e-9)
            assert lm.nc1(x, y) == pytest.approx(res.nc1[i, j], rel=1e-12)
            e, a, t = ref_nc2(x, y, k)
            got = (res.equinorm[i, j], res.equiangularity[i, j], res.etf_angle[i, j])
            assert got == pytest.approx((e, a, t), rel=1e-10)
            assert (two.equinorm[i, j], two.etf_angle[i, j]) == pytest.approx((e, t), rel=1e-10)
            assert res.nc3[i, j] == pytest.approx(ref_nc3(x, y, k, w), rel=1e-10)
            assert lm.nc3(x, y, w) == pytest.approx(res.nc3[i, j], rel=1e-12)
            assert res.nc4[i, j] == ref_nc4(x, y, k, w, b)
            assert lm.nc4(x, y, w, b) == res.nc4[i, j]
    assert set(res.as_dict()) == {"nc1", "equinorm", "equiangularity", "etf_angle", "nc3", "nc4"}
    assert lm.neural_collapse(X, y).nc3 is None


def test_nonfinite_items_give_nan_and_coincident_means_nan():
    X, y = unbalanced(40, batch=(3,), p=4)
    X[1, 0, 2] = np.inf
    for out in (lm.nc1(X, y), lm.ncc_accuracy(X, y), lm.cross_entropy(X, y),
                lm.linear_probe_loss(X, y), lm.nc4(X, y, np.eye(4)), lm.nc2(X, y).etf_angle):
        assert np.isnan(out[1]) and np.all(np.isfinite(out[[0, 2]]))
    assert math.isnan(lm.nc1(np.ones((8, 3)), np.arange(8) % 2))


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------
_Z, _R = np.zeros, np.random.default_rng(0).random
_Y4 = np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: lm.nc1(_Z(5), _Z(5, int)), r"X must have shape \(N, p\)"),
        (lambda: lm.ncc_accuracy(_Z((5, 2)), _Z(4, int)), r"y must have shape \(N,\) = \(5,\)"),
        (lambda: lm.ncc_accuracy(_Z((5, 2)), _Z((5, 1), int)), r"y must have shape"),
        (lambda: lm.nc1(_Z((4, 2)), np.array([0, 1, -1, 0])), r"labels in 0\.\.K-1"),
        (lambda: lm.nc1(_Z((4, 2)), np.array([0, 1, 3, 0]), num_classes=3),
         r"0\.\.num_classes-1"),
        (lambda: lm.nc1(_Z((4, 2)), np.array([0.5, 1, 0, 1])), r"integer class labels"),
        (lambda: lm.nc1(_R((4, 2)), 2 * _Y4), r"no samples of class\(es\) \[1\]"),
        (lambda: lm.nc1(_R((4, 2)), _Z(4, int)), r"K >= 2"),
        (lambda: lm.cross_entropy(_Z((4, 3)), _Y4, num_classes=2), r"p = K = 2"),
        (lambda: lm.argmax_accuracy(_Z((4, 3)), 3 * _Y4), r"0\.\.num_classes-1 = 0\.\.2"),
        (lambda: lm.nc3(_R((4, 3)), _Y4, np.eye(3)), r"W must have shape \(K, p\) = \(2, 3\)"),
        (lambda: lm.nc4(_R((4, 2)), _Y4, np.eye(2), b=_Z(3)), r"b must have shape"),
        (lambda: lm.nc3(_R((3, 4, 2)), _Y4, np.ones((2, 2, 2))), r"does not broadcast"),
        (lambda: lm.nc3(_R((4, 2)), _Y4, None), r"W \(read-out"),
        (lambda: lm.linear_probe_loss(_R((4, 2)), _Y4, l2=0.0), r"l2 must be > 0"),
        (lambda: lm.linear_separability(_Z((0, 2)), _Z(0, int)), r"N >= 1"),
        (lambda: lm.linear_separability(np.array([["a", "b"]]), _Z(1, int)), r"real numeric"),
        (lambda: lm.cross_entropy(_R((4, 2)), _Y4, b=_Z(2)), r"b was given without W"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
