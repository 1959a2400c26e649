"""lesde.fit: the estimators recover known impacts, their bands cover the truth, bad input fails.

Exactness. Noise-free trajectories of the linear models are built from the exact class-mean
ODE (:func:`lesde.theory.class_mean_moments`; every sample of a class gets the same drift, so
``X_j(t) = X_j(0) + Xbar_k(t) - Xbar_k(0)``): the I- and L-estimators must return A, B to
1e-6 there, for K = 3, 4, 5 and constant, power-law and rise-then-decay impacts. On the
simulator's Euler paths (step dt) the error is O(dt), and the bound is the 1% of the issue.

The regression estimator fits increments ``X(t_{i+1}) - X(t_i) = drift(t_i) dt_i``, which is
exactly the Euler recursion when the simulator's step equals the save interval: then E is
recovered to rounding. On finer-stepped (near continuous-time) paths the increment differs from
``drift(t_i) dt_i`` by O(dt_i) relative, and the bound is the 5% of the issue.

Coverage. The requirement is that nominal 95% bands cover the truth in at least 90% of
replicated fits (percentile bootstrap bands of these small-sample ratio estimators cover
0.90-0.96, see benchmarks/bench_fit.py and its 400-replicate results in benchmarks/README.md). A replicated study
of 25 independent fits asserts at least 18 covering fits: if the true coverage were exactly
0.90, P(X < 18) = 0.0023 for X ~ Binomial(25, 0.90).
"""
import warnings

import numpy as np
import pytest
import torch

from lesde.theory import euler_rates
from lesde import model as m
from lesde import theory
from lesde.fit import (
    GoodnessOfFit,
    IEstimator,
    LEstimator,
    RegressionEstimator,
    Trajectory,
    as_trajectory,
    default_window,
    goodness_of_fit,
    smooth_derivative,
    tail_index,
)
from lesde.solvers import simulate

MIN_COVERED = 18  # of 25 fits; P(Binomial(25, 0.90) < 18) = 0.0023


def _rise(a0, tp):
    """A rise-then-decay impact like real training: a0 (t/tp) exp(1 - t/tp), peak a0 at tp."""
    return lambda t: a0 * (t / tp) * np.exp(1.0 - t / tp)


def _profile(kind, K, scale=1.0):
    if kind == "constant":
        return m.Impacts.intra_inter(1.85 * scale, 0.6175 * scale, K)   # A, B = 7.40, 2.47 at t = 4
    if kind == "power_law":
        return m.Impacts.intra_inter(m.PowerLaw(3.0 * scale, 0.6), m.PowerLaw(1.0 * scale, 0.6), K)
    return m.Impacts.intra_inter(_rise(2.5 * scale, 1.0), _rise(0.8 * scale, 1.0), K)


def _class_means0(K, p, field):
    """Initial class means whose ratios used by the estimators are all well away from zero."""
    s = 1.0 + np.arange(K) + 0.5 * np.arange(K) ** 2               # distinct label coordinates
    d = np.eye(K, p) - 1.0 / K
    base = 0.5 if field == "label_projection" else 2.0
    return base + s[:, None] * d if field == "label_projection" else base + 3.0 * d


def _labels(K, n):
    return np.tile(np.arange(K), n)


def _exact_trajectory(impacts, field, ts, n=5, p=None, seed=0):
    """Noise-free exact trajectory (T, N, p) of a linear model from the class-mean ODE."""
    K = impacts.K
    p = K if p is None else p
    y = _labels(K, n)
    mu0 = _class_means0(K, p, field)
    x0 = mu0[y] + 0.3 * np.random.default_rng(seed).standard_normal((y.size, p))
    x0 -= (np.stack([x0[y == k].mean(0) for k in range(K)]) - mu0)[y]   # exact class means mu0
    mean, _ = theory.class_mean_moments(impacts, y, field, ts, mu0)
    return x0[None] + (mean - mu0[None])[:, y], y


# ---------------------------------------------------------------------------------------------
# input adapter and bad input
# ---------------------------------------------------------------------------------------------
def test_trajectory_from_arrays_solution_and_store():
    rng = np.random.default_rng(0)
    y = _labels(3, 4)
    x = rng.standard_normal((5, 12, 3))
    ts = np.linspace(0, 1, 5)
    tr = Trajectory(ts, x, y)
    assert tr.features.shape == (1, 5, 12, 3) and tr.K == 3 and tr.balanced
    assert np.allclose(tr.class_means()[0, :, 1], x[:, y == 1].mean(1))
    assert as_trajectory((ts, x, y)).features.shape == (1, 5, 12, 3)
    assert as_trajectory(x, labels=y, ts=ts).N == 12

    sde = m.LESDE(y, m.Impacts.intra_inter(1.0, 0.3, 3), "identity", sigma=0.1, dim=3)
    sol = simulate(sde, x[0], ts, 0.05, seed=0, num_runs=4)
    tr = as_trajectory(sol)
    assert tr.R == 4 and np.allclose(tr.features[2], sol.states[:, 2])

    class FakeStore:  # the read API of lesde.tracking.TrajectoryStore
        group = {}
        split = np.array([0] * 12 + [1] * 3)
        labels = np.concatenate([y, [0, 1, 2]])
        time = ts

        class config:
            num_classes = 3

        def array(self, name):
            return {"logits": rng.standard_normal((5, 15, 3)),
                    "features": rng.standard_normal((5, 15, 8))}[name]

    tr = as_trajectory(FakeStore())
    assert tr.features.shape == (1, 5, 12, 3) and np.array_equal(tr.labels, y)
    assert as_trajectory(FakeStore(), what="features", split="all").features.shape == (1, 5, 15, 8)


@pytest.mark.parametrize("make, match", [
    (lambda: Trajectory(np.arange(3.0), np.zeros((3, 6)), np.zeros(6)), "features must have shape"),
    (lambda: Trajectory(np.arange(4.0), np.zeros((3, 6, 2)), _labels(3, 2)),
     "features has 3 times"),
    (lambda: Trajectory([0.0, 2.0, 1.0], np.zeros((3, 6, 2)), _labels(3, 2)),
     "strictly increasing"),
    (lambda: Trajectory(np.arange(3.0), np.zeros((3, 6, 2)), _labels(3, 3)),
     "labels must have shape"),
    (lambda: Trajectory(np.arange(3.0), np.zeros((3, 6, 2)), np.array([0, 0, 1, 1, 3, 3])),
     r"class\(es\) \[2\] have no"),
    (lambda: Trajectory(np.arange(3.0), np.full((3, 6, 2), np.nan), _labels(3, 2)), "non-finite"),
    (lambda: Trajectory(np.arange(3.0), np.zeros((3, 6, 2)), np.zeros(6)), "at least K = 2"),
    (lambda: as_trajectory(np.zeros((3, 6, 2))), "needs labels"),
])
def test_bad_trajectory_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_estimator_input():
    ts = np.linspace(0, 1, 11)
    x, y = _exact_trajectory(_profile("constant", 3, 0.2), "identity", ts, p=2)
    tr = Trajectory(ts, x, y)
    with pytest.raises(ValueError, match="p = K = 3"):
        LEstimator().fit(tr)
    with pytest.raises(ValueError, match="needs several independent trials"):
        IEstimator(n_bootstrap=5, bootstrap="trials").fit(tr)
    with pytest.raises(ValueError, match="bootstrap must be one of"):
        IEstimator(n_bootstrap=5, bootstrap="cases").fit(tr)
    with pytest.raises(ValueError, match="n_bootstrap"):
        IEstimator(n_bootstrap=-1).fit(tr)
    with pytest.raises(ValueError, match="level"):
        IEstimator(level=95).fit(tr)
    with pytest.raises(ValueError, match="positive width in time units"):
        IEstimator(window=-1.0).fit(tr)
    with pytest.raises(ValueError, match="combine"):
        IEstimator(combine="mean").fit(tr)
    with pytest.raises(ValueError, match="too few rows"):
        RegressionEstimator(window=1).fit(tr)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        RegressionEstimator(window=0).fit(tr)
    with pytest.raises(ValueError, match="quadrature must be 'left' or 'trapezoid'"):
        RegressionEstimator(quadrature="simpson").fit(tr)
    with pytest.raises(ValueError, match="not fitted"):
        IEstimator().results()
    sol = simulate(m.LESDE(y, m.Impacts.intra_inter(1.0, 0.3, 3), "identity", dim=2), x[0],
                   ts, 0.1, seed=0, record="summary")
    with pytest.raises(ValueError, match="record='full'"):
        as_trajectory(sol)
    with pytest.raises(ValueError, match="cross-entropy-on-logits field needs p = K"):
        RegressionEstimator("cross_entropy").fit(tr)


def test_sign_changes_lose_no_time():
    """A coordinate crossing zero costs no logged time (the modes are projected, not divided
    coordinate by coordinate); a whole mode turning against its start is NaN (or an error)."""
    ts = np.linspace(0, 1, 11)
    x, y = _exact_trajectory(_profile("constant", 3, 0.2), "identity", ts, p=2)
    full = IEstimator(n_bootstrap=0).fit(Trajectory(ts, x, y))
    # a noisy I-model path whose grand-mean coordinate 1 starts near zero and crosses it
    K = 3
    yy = _labels(K, 30)
    mu = np.array([[2.0, 0.05], [4.0, -1.0], [0.5, 1.0]])
    x0 = mu[yy] + 0.3 * np.random.default_rng(0).standard_normal((yy.size, 2))
    sol = simulate(m.LESDE(yy, m.Impacts.intra_inter(1.0, 0.3, K), "identity", sigma=0.3,
                           dim=2), x0, ts, 0.01, seed=1)
    grand = sol.class_means[:, 0].mean(1)
    assert np.any(np.sign(grand[:, 1]) != np.sign(grand[0, 1]))    # a coordinate crosses zero
    est = IEstimator(n_bootstrap=0).fit(sol)
    assert np.all(np.isfinite(est.A_)) and np.all(np.isfinite(est.alpha_))
    assert est.n_reversed_ == 0
    # the authors' rule (mean of log|ratio|) is exact on exact paths too
    la = IEstimator(combine="log_abs", n_bootstrap=0).fit(Trajectory(ts, x, y))
    np.testing.assert_allclose(la.A_, full.A_, rtol=1e-9, atol=1e-12)
    x3 = x.copy()
    x3[6:] *= -1.0                                  # every mode flips: impossible in the model
    with pytest.raises(ValueError, match="turned against its start"):
        IEstimator(on_reversed="raise").fit(Trajectory(ts, x3, y))
    with pytest.warns(UserWarning, match="at 5 of 11 logged times a mode"):
        est = IEstimator(n_bootstrap=0, on_reversed="nan").fit(Trajectory(ts, x3, y))
    assert np.all(np.isnan(est.A_[6:])) and np.all(np.isfinite(est.A_[:6]))
    with pytest.warns(UserWarning, match="magnitude"):       # the default reads |amplitude|
        est = IEstimator(n_bootstrap=0).fit(Trajectory(ts, x3, y))
    np.testing.assert_allclose(est.A_, full.A_, rtol=1e-9, atol=1e-12)


def test_unbalanced_classes_warn():
    ts = np.linspace(0, 1, 11)
    x, y = _exact_trajectory(_profile("constant", 3, 0.2), "identity", ts, p=2)
    keep = np.ones(y.size, bool)
    keep[np.flatnonzero(y == 0)[:2]] = False
    with pytest.warns(UserWarning, match="unbalanced"):
        IEstimator().fit(Trajectory(ts, x[:, keep], y[keep]))


# ---------------------------------------------------------------------------------------------
# noise-free exactness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["constant", "power_law", "rise"])
@pytest.mark.parametrize("K", [3, 4, 5])
def test_mode_estimators_exact(kind, K):
    imp = _profile(kind, K)
    ts = np.linspace(0, 4, 41)
    A, B = imp.integrals(4.0)
    for field, Est in (("identity", IEstimator), ("label_projection", LEstimator)):
        x, y = _exact_trajectory(imp, field, ts)
        est = Est().fit(Trajectory(ts, x, y))
        np.testing.assert_allclose([est.A_[-1], est.B_[-1]], [A, B], rtol=1e-6)
        At = np.array([imp.integrals(t)[0] for t in ts[1:]])
        np.testing.assert_allclose(est.A_[1:], At, rtol=1e-6)


def test_lestimator_general_k_not_the_k3_shortcut():
    """On an exact L-model path with A = 7.40, B = 2.47 (K = 3) the estimate is exact (the
    original code's K = 3 shortcut returned 4.35, 1.36 there)."""
    imp = _profile("constant", 3)
    ts = np.linspace(0, 4, 21)
    x, y = _exact_trajectory(imp, "label_projection", ts)
    est = LEstimator().fit(Trajectory(ts, x, y))
    np.testing.assert_allclose([est.A_[-1], est.B_[-1]], [7.40, 2.47], rtol=1e-6)


@pytest.mark.parametrize("field, Est", [("identity", IEstimator), ("label_projection", LEstimator)])
def test_mode_estimators_on_simulator_within_one_percent(field, Est):
    imp = _profile("rise", 3)
    y = _labels(3, 10)
    x0 = _class_means0(3, 3, field)[y] + 0.3 * np.random.default_rng(0).standard_normal((30, 3))
    ts = np.linspace(0, 4, 21)
    sol = simulate(m.LESDE(y, imp, field, dim=3), x0, ts, 0.002, seed=0)
    est = Est().fit(sol)
    A, B = imp.integrals(4.0)
    np.testing.assert_allclose([est.A_[-1], est.B_[-1]], [A, B], rtol=0.01)


def test_rates_by_savitzky_golay():
    ts = np.linspace(0, 4, 81)
    imp = _profile("constant", 3)
    x, y = _exact_trajectory(imp, "identity", ts)
    est = IEstimator().fit(Trajectory(ts, x, y))
    np.testing.assert_allclose(est.alpha_, 1.85, rtol=1e-6)
    np.testing.assert_allclose(est.beta_, 0.6175, rtol=1e-6)
    imp = _profile("rise", 3)
    x, y = _exact_trajectory(imp, "identity", ts)
    est = IEstimator(window=6 * (ts[1] - ts[0])).fit(Trajectory(ts, x, y))   # 7 points
    truth = np.array([imp.alpha(t) for t in ts])
    # a local quadratic has O(h^2 alpha'') bias; the ends (half a window) use one-sided fits
    assert np.max(np.abs(est.alpha_ - truth)[3:-3]) < 0.02 * truth.max()
    assert np.max(np.abs(est.alpha_ - truth)) < 0.05 * truth.max()
    # the default width is in time: 4 median intervals, whatever the log density
    assert default_window(ts) == pytest.approx(4 * 0.05)
    assert default_window(np.linspace(0, 4, 401)) == pytest.approx(4 * 0.01)
    # a width in time units reproduces scipy's Savitzky-Golay filter on a uniform log
    from scipy.signal import savgol_filter
    v = np.sin(ts) + ts ** 3
    np.testing.assert_allclose(smooth_derivative(ts, v, window=8 * 0.05),
                               savgol_filter(v, 9, 2, deriv=1, delta=0.05, mode="interp"),
                               rtol=1e-9, atol=1e-9)
    # non-uniform times: interpolated to a uniform grid and back
    tn = np.sort(np.concatenate([np.linspace(0, 3, 40), [3.07]]))
    np.testing.assert_allclose(smooth_derivative(tn, tn ** 2, window=5)[1:-1], 2 * tn[1:-1],
                               atol=0.02)


def test_tail_index():
    ts = np.logspace(-1, 5, 200)
    # the integral form converges slowly near r = 1: A = (t^(1-r) - 1)/(1-r) has local slope
    # (1-r) t^(1-r) / (t^(1-r) - 1), i.e. r_hat = 0.85 at r = 0.9 and t = 1e5
    for r, tol in ((0.3, 0.02), (0.6, 0.02), (0.9, 0.08)):
        A = m.PowerLaw(1.0, r).integral
        est = tail_index(ts, np.array([float(A(t)) for t in ts]), tail=0.3)
        assert abs(est["r"] - r) < tol, (r, est)
        alpha = m.PowerLaw(1.0, r)
        est = tail_index(ts, np.array([float(alpha(t)) for t in ts]), kind="rate", tail=0.3)
        assert abs(est["r"] - r) < 0.01
    A = m.PowerLaw(1.0, 1.5).integral
    assert abs(tail_index(ts, np.array([float(A(t)) for t in ts]), tail=0.3)["r"] - 1.0) < 0.05
    with pytest.raises(ValueError, match="kind"):
        tail_index(ts, ts, kind="slope")


@pytest.mark.parametrize("field", ["identity", "cross_entropy", "label_projection", "readout"])
def test_regression_exact_on_euler_recursion(field):
    """Simulator step = save interval: the increments are the Euler recursion, E exact."""
    K, p = 3, 3
    W = None
    if field == "readout":
        p = 4
        W = np.random.default_rng(3).standard_normal((K, p))
        fld = m.CrossEntropyReadout(W)
    else:
        fld = field
    E = np.array([[1.0, 0.3, -0.2], [0.1, 0.8, 0.4], [0.5, -0.3, 1.2]])
    y = _labels(K, 20)
    x0 = 0.5 * np.random.default_rng(0).standard_normal((y.size, p))
    ts = np.linspace(0, 10 if field != "identity" else 2, 101)
    sol = simulate(m.LESDE(y, m.Impacts(E), fld, dim=p), x0, ts, ts[1], seed=0)
    with warnings.catch_warnings():       # the read-out design is ill-conditioned but exact here
        warnings.simplefilter("ignore", UserWarning)
        est = RegressionEstimator(fld, window=10, quadrature="left", degree=0,
                                  n_bootstrap=0).fit(sol)
    np.testing.assert_allclose(est.E_, np.broadcast_to(E, est.E_.shape), atol=1e-7)
    assert np.all(est.sigma_ < 1e-6)


@pytest.mark.parametrize("kind", ["constant", "power_law", "rise"])
def test_regression_time_varying_impacts(kind):
    """One trial, near-continuous paths (step = save interval / 5): identity E within 5%;
    cross-entropy alpha, beta within 5%, and a warning that its full E is not identified from
    one trial (see RegressionEstimator, "Identifiability", and the next test)."""
    K = 3
    imp = _profile(kind, K, 0.5)
    y = _labels(K, 10)
    x0 = 0.5 * np.random.default_rng(0).standard_normal((y.size, K)) + 1.0
    ts = np.linspace(0.02, 2.02, 101)
    sol = simulate(m.LESDE(y, imp, "identity", dim=K), x0, ts, ts[1] - ts[0], seed=0)
    est = RegressionEstimator("identity", window=10, degree=1, quadrature="left").fit(sol)
    truth = np.stack([imp.matrix(t) for t in est.window_times_])
    assert np.max(np.abs(est.E_ - truth) / np.abs(truth).max(axis=(1, 2))[:, None, None]) < 0.05
    fine = simulate(m.LESDE(y, imp, "identity", dim=K), x0, ts, (ts[1] - ts[0]) / 5, seed=0)
    est = RegressionEstimator("identity", window=10, degree=1, quadrature="left").fit(fine)
    assert np.max(np.abs(est.E_ - truth) / np.abs(truth).max(axis=(1, 2))[:, None, None]) < 0.05
    ts = np.linspace(0.05, 10.05, 101)
    sol = simulate(m.LESDE(y, imp, "cross_entropy"), x0, ts, (ts[1] - ts[0]) / 5, seed=0)
    with pytest.warns(UserWarning, match="poorly identified"):   # one trial: E not identified
        est = RegressionEstimator("cross_entropy", window=5, quadrature="left", degree=0,
                                  n_bootstrap=0).fit(sol)
    a = np.array([np.mean([imp.matrix(t)[0, 0] for t in np.linspace(*b, 26)[:-1]])
                  for b in est.window_bounds_])
    b = np.array([np.mean([imp.matrix(t)[0, 1] for t in np.linspace(*bb, 26)[:-1]])
                  for bb in est.window_bounds_])
    assert np.max(np.abs(est.alpha_ - a) / a) < 0.05
    assert np.max(np.abs(est.beta_ - b) / a) < 0.05


_E_GENERAL = np.array([[1.0, 0.3, -0.2], [0.1, 0.8, 0.4], [0.5, -0.3, 1.2]])


@pytest.mark.parametrize("kind", ["constant", "power_law", "rise", "general"])
@pytest.mark.parametrize("field", ["identity", "label_projection", "cross_entropy"])
def test_regression_full_E_from_several_trials(field, kind):
    """The whole K x K E(t) within 5%, noise-free, for the I-, L- and cross-entropy models.

    Four trials from different initial class means make the K regressors independent at every
    time (one trial does not for the L and cross-entropy fields, see the test above). Profiles:
    the intra/inter constant, power-law and rise-then-decay ones, and a general asymmetric
    ``E(t) = rise(t) E0``. The simulator steps at a tenth of the save interval, so the paths are
    near-continuous. Left-point rule with a local-linear E (degree 1): the error is the
    first-order quadrature error, at most 3.5% here (the rise profile varies fastest at the first
    window). Trapezoid rule with a local-quadratic E (degree 2): the quadrature error is second
    order and what remains is the simulator's own O(h) Euler error, below 1% here."""
    K, R = 3, 4
    if kind == "general":
        rise = _rise(1.0, 1.0)
        imp = m.Impacts(lambda t: rise(t) * _E_GENERAL)
    else:
        imp = _profile(kind, K, 0.5)
    y = _labels(K, 10)
    rng = np.random.default_rng(0)
    x0 = 0.5 * rng.standard_normal((R, y.size, K)) + 2.0 * rng.standard_normal((R, 1, K))
    ts = np.linspace(0.05, 2.05 if field == "identity" else 10.05, 201)
    sol = simulate(m.LESDE(y, imp, field, dim=K), x0, ts, (ts[1] - ts[0]) / 10, seed=0)
    for quadrature, degree, bound in (("left", 1, 0.05), ("trapezoid", 2, 0.01)):
        est = RegressionEstimator(field, window=10, degree=degree, quadrature=quadrature).fit(sol)
        truth = np.stack([imp.matrix(t) for t in est.window_times_])
        err = np.abs(est.E_ - truth) / np.abs(truth).max(axis=(1, 2))[:, None, None]
        assert err.max() < bound, (quadrature, err.max())
        assert est.condition_.max() < RegressionEstimator.CONDITION_WARN


def test_regression_quadrature_rules_on_exact_linear_path():
    """On an exact (ODE-solved) I-model path with constant E, the left-point rule is off by
    O(dt) and the trapezoid rule by O(dt^2): halving the save interval divides the errors by about
    2 and 4."""
    imp = m.Impacts(_E_GENERAL * 0.5)
    errs = {"left": [], "trapezoid": []}
    for n in (41, 81):
        ts = np.linspace(0, 2, n)
        x, y = _exact_trajectory(imp, "identity", ts)
        for rule in errs:
            est = RegressionEstimator(window=n - 1, quadrature=rule, degree=0,
                                      n_bootstrap=0).fit(Trajectory(ts, x, y))
            errs[rule].append(np.abs(est.E_[0] - imp.matrix(0.0)).max())
    assert 1.7 < errs["left"][0] / errs["left"][1] < 2.3, errs
    assert 3.4 < errs["trapezoid"][0] / errs["trapezoid"][1] < 4.6, errs
    assert errs["trapezoid"][1] < 0.1 * errs["left"][1]


# ---------------------------------------------------------------------------------------------
# uncertainty
# ---------------------------------------------------------------------------------------------
def _euler_truth(alpha, beta, K, dt, t, field):
    """A(t), B(t), alpha, beta implied by the Euler recursion of step dt with constant impacts.

    The mean modes of the linear models are multiplied by (1 + dt lam) per step instead of
    exp(dt lam); the estimators see these effective rates (e.g. A is 0.4% low at dt = 0.02 in the
    I-model with alpha = 1, beta = 0.3, a third of the bootstrap standard error of the studies)."""
    a, b = euler_rates(alpha, beta, K, dt, "identity" if field == "identity" else "label_projection")
    return a * t, b * t, a, b


def _tracked_subsets(K=3, npop=300, m_tr=40, R=25, sigma=0.3, field="identity", seed=1):
    """R independent populations (npop per class) simulated with constant impacts; a random
    subset of m_tr samples per class is tracked. Returns (list of Trajectory, and the A(T),
    B(T), alpha, beta that the simulator's Euler recursion implies)."""
    y = _labels(K, npop)
    rng = np.random.default_rng(seed)
    mu = _class_means0(K, K, field)
    x0 = mu[y][None] + 0.5 * rng.standard_normal((R, y.size, K))
    ts = np.linspace(0, 2, 21)
    imp = m.Impacts.intra_inter(1.0, 0.3, K)
    sol = simulate(m.LESDE(y, imp, field, sigma=sigma, dim=K), x0, ts, 0.02, seed=seed,
                   record="full")
    out = []
    for r in range(R):
        idx = np.concatenate([rng.choice(np.flatnonzero(y == k), m_tr, replace=False)
                              for k in range(K)])
        out.append(Trajectory(ts, sol.states[:, r][:, idx], y[idx]))
    return (out,) + _euler_truth(1.0, 0.3, K, 0.02, 2.0, field)


def test_band_from_few_replicates_holds_its_level():
    """A band between sample quantiles of B draws holds a new draw of the same distribution
    with probability E[F(q_hi) - F(q_lo)]. For type-6 quantiles that is the level at every B;
    NumPy's default (type 7) gives 0.904 at B = 40 (the coverage matrix's bootstrap size)."""
    from scipy.stats import norm
    from lesde.fit.uncertainty import band_from_replicates, percentile_band

    rng = np.random.default_rng(0)
    M, B = 4000, 40
    draws = rng.standard_normal((B, M))
    band = percentile_band(draws, 0.95)
    mass = norm.cdf(band[1]) - norm.cdf(band[0])
    se = mass.std(ddof=1) / np.sqrt(M)
    assert abs(mass.mean() - 0.95) < 4 * se, (mass.mean(), se)
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)        # type 7: too narrow
    assert (norm.cdf(hi) - norm.cdf(lo)).mean() < 0.95 - 20 * se
    # the basic interval of a pivot (theta_hat - theta distributed as theta* - theta_hat)
    # covers at the same rate: theta = 0, theta_hat and the B replicates around it
    theta_hat = rng.standard_normal(M)
    reps = theta_hat + rng.standard_normal((B, M))
    basic = band_from_replicates(theta_hat, reps, 0.95, "basic")
    hits = (basic[0] <= 0) & (0 <= basic[1])
    assert abs(hits.mean() - 0.95) < 4 * np.sqrt(0.95 * 0.05 / M), hits.mean()
    # a replicate that failed (NaN) is left out, not counted as a value
    reps[0, :] = np.nan
    assert np.all(np.isfinite(band_from_replicates(theta_hat, reps, 0.95, "basic")))


@pytest.mark.parametrize("field, Est", [("identity", IEstimator), ("label_projection", LEstimator)])
def test_bootstrap_bands_cover_truth_replicated(field, Est):
    trajs, A, B, alpha, beta = _tracked_subsets(field=field)
    covered = np.zeros(4, int)
    for r, tr in enumerate(trajs):
        est = Est(n_bootstrap=100, seed=r).fit(tr)
        bands = est.bands_
        covered += [bands["A"][0, -1] <= A <= bands["A"][1, -1],
                    bands["B"][0, -1] <= B <= bands["B"][1, -1],
                    bands["alpha"][0, 10] <= alpha <= bands["alpha"][1, 10],
                    bands["beta"][0, 10] <= beta <= bands["beta"][1, 10]]
        assert bands["A"].shape == (2, 21) and est.bootstrap_mode_ == "samples"
    assert np.all(covered >= MIN_COVERED), covered


def test_trials_bootstrap_and_multi_trial_average():
    K, R = 3, 12
    y = _labels(K, 30)
    noise = np.random.default_rng(0).standard_normal((90, K))
    x0 = _class_means0(K, K, "identity")[y] + 0.3 * noise
    ts = np.linspace(0, 2, 21)
    sol = simulate(m.LESDE(y, m.Impacts.intra_inter(1.0, 0.3, K), "identity", sigma=0.3, dim=K),
                   x0, ts, 0.02, seed=5, num_runs=R)
    est = IEstimator(n_bootstrap=200, seed=0).fit(sol)
    assert est.bootstrap_mode_ == "trials" and est.A_trials_.shape == (R, 21)
    np.testing.assert_allclose(est.A_, est.A_trials_.mean(0))
    assert est.bands_["A"][0, -1] <= 2.0 <= est.bands_["A"][1, -1]
    assert est.bands_["B"][0, -1] <= 0.6 <= est.bands_["B"][1, -1]
    both = IEstimator(n_bootstrap=50, bootstrap="both", seed=0).fit(sol)
    assert np.all(np.diff(both.bands_["A"][:, 1:], axis=0) > 0)   # A(0) = 0 exactly
    # the same seed gives the same bands
    again = IEstimator(n_bootstrap=200, seed=0).fit(sol)
    np.testing.assert_array_equal(again.bands_["A"], est.bands_["A"])


def test_regression_intervals_cover_truth_replicated():
    """Euler recursion with additive noise: least-squares intervals (E, alpha, beta) and the
    sample bootstrap band of alpha cover the truth."""
    K, R = 3, 25
    y = _labels(K, 60)
    rng = np.random.default_rng(2)
    x0 = _class_means0(K, K, "identity")[y][None] + 0.5 * rng.standard_normal((R, y.size, K))
    ts = np.linspace(0, 2, 41)
    imp = m.Impacts.intra_inter(1.0, 0.3, K)
    sol = simulate(m.LESDE(y, imp, "identity", sigma=0.3, dim=K), x0, ts, ts[1], seed=3)
    E0 = imp.matrix(0.0)
    cov_E, cov_a, cov_b, cov_boot = 0, 0, 0, 0
    for r in range(R):
        est = RegressionEstimator("identity", window=20, n_bootstrap=60, seed=r,
                                  quadrature="left", degree=0).fit(
            Trajectory(ts, sol.states[:, r], y))
        cov_E += np.all((est.E_ci_[0, 0, 0] <= E0[0]) & (E0[0] <= est.E_ci_[1, 0, 0]))
        cov_a += est.alpha_ci_[0, 0] <= 1.0 <= est.alpha_ci_[1, 0]
        cov_b += est.beta_ci_[0, 0] <= 0.3 <= est.beta_ci_[1, 0]
        cov_boot += est.bands_["alpha"][0, 0] <= 1.0 <= est.bands_["alpha"][1, 0]
        np.testing.assert_allclose(est.sigma_, 0.3, rtol=0.1)
    # the row of E: three intervals jointly, P(all cover) >= 0.9^3 = 0.729 if independent
    assert cov_E >= 13, cov_E      # P(Binomial(25, 0.729) < 13) = 0.0071
    assert cov_a >= MIN_COVERED and cov_b >= MIN_COVERED and cov_boot >= MIN_COVERED, \
        (cov_a, cov_b, cov_boot)
    assert est.bands_["E"].shape == (2, 2, K, K)


def test_regression_cross_entropy_bootstrap_covers_truth_replicated():
    """Cross-entropy drift with noise: populations of 300 per class in 4 trials (different
    initial class means, so the whole E is identified), 40 per class tracked. The sample
    bootstrap bands of every entry of E and of alpha, beta cover the truth in at least 18 of 25
    fits each. If an entry's true coverage were 0.90, it would fail with probability 0.0023,
    and any of the 11 quantities with at most 11 x 0.0023 = 0.025 (the 100-fit study is in
    benchmarks/bench_fit.py)."""
    K, R, npop, m_tr = 3, 4, 300, 40
    imp = m.Impacts.intra_inter(1.0, 0.3, K)
    E0 = imp.matrix(0.0)
    y = _labels(K, npop)
    ts = np.linspace(0, 4, 41)
    hits = np.zeros((K, K), int)
    hits_ab = np.zeros(2, int)
    for rep in range(25):
        rng = np.random.default_rng(3000 + rep)
        x0 = 0.5 * rng.standard_normal((R, y.size, K)) + rng.standard_normal((R, 1, K))
        sol = simulate(m.LESDE(y, imp, "cross_entropy", sigma=0.2), x0, ts, ts[1], seed=rep)
        idx = np.concatenate([rng.choice(np.flatnonzero(y == k), m_tr, replace=False)
                              for k in range(K)])
        tr = Trajectory(ts, np.swapaxes(sol.states[:, :, idx], 0, 1), y[idx])
        est = RegressionEstimator("cross_entropy", window=40, n_bootstrap=100, quadrature="left",
                                  degree=0,
                                  bootstrap="samples", seed=rep).fit(tr)
        band = est.bands_["E"][:, 0]
        hits += (band[0] <= E0) & (E0 <= band[1])
        hits_ab += [est.bands_["alpha"][0, 0] <= 1.0 <= est.bands_["alpha"][1, 0],
                    est.bands_["beta"][0, 0] <= 0.3 <= est.bands_["beta"][1, 0]]
    assert np.all(hits >= MIN_COVERED) and np.all(hits_ab >= MIN_COVERED), (hits, hits_ab)


# ---------------------------------------------------------------------------------------------
# goodness of fit
# ---------------------------------------------------------------------------------------------
def test_goodness_of_fit_identity_and_cross_entropy():
    K = 3
    y = _labels(K, 30)
    noise = np.random.default_rng(0).standard_normal((90, K))
    x0 = _class_means0(K, K, "identity")[y] + 0.3 * noise
    ts = np.linspace(0, 2, 21)
    imp = m.Impacts.intra_inter(1.0, 0.3, K)
    log = simulate(m.LESDE(y, imp, "identity", sigma=0.2, dim=K), x0, ts, 0.02, seed=7)
    est = IEstimator().fit(log)
    gof = goodness_of_fit(log, est, n_paths=100, seed=0)
    assert isinstance(gof, GoodnessOfFit)
    assert gof.r2 > 0.99 and gof.coverage > 0.8 and gof.spread_rel_error < 0.3, gof.summary()
    assert gof.sim_means.shape == (21, K, K) and gof.sim_accuracy.shape == (21,)
    wrong = goodness_of_fit(log, m.Impacts.intra_inter(0.3, 1.0, K), field="identity",
                            noise="additive", sigma=0.2, n_paths=50)
    assert wrong.r2 < gof.r2 - 0.1 and wrong.coverage < 0.5

    x0 = 0.5 * np.random.default_rng(1).standard_normal((90, K))
    ts = np.linspace(0, 20, 41)
    log = simulate(m.LESDE(y, imp, "cross_entropy", sigma=0.05), x0, ts, 0.1, seed=7)
    reg = RegressionEstimator("cross_entropy", window=8, n_bootstrap=0).fit(log)
    gof = goodness_of_fit(log, reg, n_paths=50, seed=1)
    assert gof.r2 > 0.95 and gof.accuracy_mae < 0.1, gof.summary()
    assert np.isfinite(gof.logged_accuracy).all() and set(gof.summary()) >= {"r2", "coverage"}


def test_fit_a_real_trajectory_store(tmp_path):
    """A tiny logged training run: the adapter reads the train split's logits at t = step * lr,
    and every estimator and the goodness of fit run on it."""
    from lesde.tracking import TrainConfig, train_and_track

    g = torch.Generator().manual_seed(0)
    K, n = 3, 40
    y = torch.arange(K).repeat(n)
    x = torch.randn(K * n, 5, generator=g) + 2 * torch.nn.functional.one_hot(y, 5).float()
    cfg = TrainConfig(net="mlp", num_classes=K, net_kwargs={"in_dim": 5, "hidden": [16]},
                      lr=0.05, batch_size=1, steps=200, log_every=10, track_per_class=10, seed=0)
    store = train_and_track(cfg, (x, y), store=str(tmp_path / "run"), progress=False)
    tr = as_trajectory(str(tmp_path / "run"))
    assert tr.features.shape == (1, 21, 30, K) and np.allclose(tr.ts, 0.05 * store.step)
    assert as_trajectory(store, what="features").p == 16
    with pytest.warns(UserWarning, match="turned against its start"):
        est = IEstimator(n_bootstrap=20).fit(store)
    assert est.A_.shape == (21,) and est.bands_["A"].shape == (2, 21)
    reg = RegressionEstimator("cross_entropy", window=5, n_bootstrap=10).fit(store)
    assert reg.E_.shape == (4, K, K) and np.all(np.isfinite(reg.alpha_))
    gof = goodness_of_fit(store, reg, n_paths=10)
    assert 0 <= gof.coverage <= 1 and np.isfinite(gof.r2)

    # a second run with another seed: the two runs become two trials
    cfg2 = TrainConfig(**{**cfg.to_dict(), "seed": 1})
    store2 = train_and_track(cfg2, (x, y), store=str(tmp_path / "run2"), progress=False)
    both = as_trajectory([str(tmp_path / "run"), store2])
    assert both.R == 2 and both.features.shape == (2, 21, 30, K)
    np.testing.assert_array_equal(both.features[1], as_trajectory(store2).features[0])
    reg2 = RegressionEstimator("cross_entropy", window=5, n_bootstrap=10).fit(both)
    assert reg2.bootstrap_mode_ == "trials" and np.all(np.isfinite(reg2.E_))
    short = TrainConfig(**{**cfg.to_dict(), "seed": 1, "steps": 100})
    train_and_track(short, (x, y), store=str(tmp_path / "short"), progress=False)
    with pytest.raises(ValueError, match="other times"):
        as_trajectory([store, str(tmp_path / "short")])
    with pytest.raises(ValueError, match="a list source must hold logs"):
        as_trajectory([store, np.zeros(3)])
