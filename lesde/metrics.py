r"""Separability and neural-collapse metrics of labelled feature clouds.

Every function takes features ``X`` of shape ``(N, p)`` (one feature vector per training sample)
or batched ``(..., N, p)`` -- e.g. ``(B, N, p)`` independent runs, or ``(T, B, N, p)`` over
recorded times -- and integer labels ``y`` of shape ``(N,)`` with values in ``0..K-1``, shared by
every batch item. ``K = num_classes`` defaults to ``y.max() + 1``. ``X`` may be a numpy array or a
torch tensor (it is detached and copied to the CPU); all computations are done in float64.
Unbatched input gives Python floats (or bools), batched input gives numpy arrays with the leading
(batch) shape.

Two notions of separability are measured (see the README on which one is the order parameter of
the phase transition of the locally elastic SDE, Zhang, Wang & Su, NeurIPS 2021):

* the exact test for separability by *any* affine multi-class classifier, a linear program
  (:func:`linear_separability`);
* proxies cheap enough for every recorded time: :func:`ncc_accuracy`,
  :func:`argmax_accuracy`, :func:`cross_entropy` (of the model's own logits or of a fixed
  read-out) and :func:`linear_probe_loss`.

Neural collapse (Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal phase of
deep learning training", PNAS 117 (40), 2020) is measured by :func:`nc1`, :func:`nc2`,
:func:`nc3`, :func:`nc4` and all at once by :func:`neural_collapse`.

Conventions (the same in every function):

* **Class weighting.** Every class weighs the same: the global mean is the mean of the class
  means, :math:`\mu_G = \frac1K \sum_k \mu_k`, and the within-class covariance is the average of
  the per-class covariances. For balanced classes this is exactly the definition of Papyan et al.;
  for unbalanced classes it keeps the columns of :math:`M` summing to zero, so that the simplex
  ETF geometry stays defined. Accuracies and losses are means over samples (training error).
* **Ties.** A sample counts as correctly classified (argmax or nearest class centre) only if its
  own class is *strictly* better than every other class; identical features (e.g. all zero at
  initialisation) are not "correct" for class 0. Where an index is needed (NC4), ties go to the
  lowest class index.
* **Non-finite features.** A batch item whose features contain NaN or inf gets NaN for every
  numeric result (``separable`` is False with a NaN ``margin``); other items are unaffected, so a
  diverging run in a sweep does not stop the measurement of the others.
* **Huge features.** Scale-invariant measures (nearest centre, argmax, LP separability, NC1-NC4)
  are computed on each item divided by a power of two near its largest entry, which is exact,
  so finite features of any size (1e200, 1e300) are scored correctly instead of overflowing
  inside the computation. The cross-entropy is computed stably in the original units. Everything else that is
  wrong with the input (shapes, labels out of range, a class without samples where class means are
  needed) raises ``ValueError`` naming the argument and the expected shape.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

__all__ = [
    "LinearSeparability",
    "NC2",
    "NeuralCollapse",
    "linear_separability",
    "ncc_accuracy",
    "argmax_accuracy",
    "cross_entropy",
    "linear_probe_loss",
    "nc1",
    "nc2",
    "nc3",
    "nc4",
    "neural_collapse",
    "order_parameters",
]

# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------
def _to_numpy(a, name):
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # a torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise ValueError(f"{name} could not be converted to an array: {exc}") from exc


def _features(X, name="X"):
    """Features as float64 of shape (..., N, p); returns (X, batch_shape)."""
    X = _to_numpy(X, name)
    if X.dtype == object or np.iscomplexobj(X) or not (
        np.issubdtype(X.dtype, np.number) or X.dtype == bool
    ):
        raise ValueError(
            f"{name} must be a real numeric array of shape (..., N, p); got dtype {X.dtype}"
        )
    if X.ndim < 2:
        raise ValueError(f"{name} must have shape (N, p) or (..., N, p); got shape {X.shape}")
    if X.shape[-2] == 0 or X.shape[-1] == 0:
        raise ValueError(
            f"{name} must have N >= 1 samples and p >= 1 features; got shape {X.shape}"
        )
    return X.astype(np.float64, copy=False), X.shape[:-2]


def _labels(y, n, num_classes, name="y"):
    """Integer labels of shape (N,) in 0..K-1; returns (y, K)."""
    y = _to_numpy(y, name)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape (N,) = ({n},) to match X; got shape {y.shape}")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        integral = np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y))
        if integral and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer class labels 0..K-1; got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"{name} must hold labels in 0..K-1; found {y.min()}")
    if num_classes is None:
        k = int(y.max()) + 1
    else:
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
        k = int(num_classes)
        if y.max() >= k:
            raise ValueError(
                f"{name} must hold labels in 0..num_classes-1 = 0..{k - 1}; found {y.max()}"
            )
    return y, k


def _readout(W, b, batch_shape, k, p, name="W"):
    """Read-out W of shape (..., K, p) and bias (..., K), broadcastable to the batch shape."""
    W = _to_numpy(W, name).astype(np.float64)
    if W.ndim < 2 or W.shape[-2:] != (k, p):
        raise ValueError(
            f"{name} must have shape (K, p) = ({k}, {p}) or (..., {k}, {p}); got {W.shape}"
        )
    try:
        np.broadcast_shapes(W.shape[:-2], batch_shape)
    except ValueError:
        raise ValueError(
            f"{name} batch shape {W.shape[:-2]} does not broadcast with the feature batch "
            f"shape {batch_shape}"
        ) from None
    if b is None:
        b = np.zeros((k,))
    else:
        b = _to_numpy(b, "b").astype(np.float64)
        if b.ndim < 1 or b.shape[-1] != k:
            raise ValueError(f"b must have shape (K,) = ({k},) or (..., {k}); got {b.shape}")
        try:
            np.broadcast_shapes(b.shape[:-1], batch_shape)
        except ValueError:
            raise ValueError(
                f"b batch shape {b.shape[:-1]} does not broadcast with the feature batch "
                f"shape {batch_shape}"
            ) from None
    return W, b


def _clean(X):
    """Replace non-finite batch items by zeros; returns (X, ok) with ok of the batch shape."""
    ok = np.isfinite(X).all(axis=(-2, -1))
    if not ok.all():
        X = np.where(ok[..., None, None], X, 0.0)
    return X, ok


def _unit_scale(X):
    """Divide each batch item by a power of two near its largest |entry|: returns
    ``(X 2^-e, e)`` with ``e`` of the batch shape (0 for all-zero items).

    Scaling by a power of two is exact in floating point (no rounding, barring underflow of
    entries 1e-300 times smaller than the largest), so every scale-invariant result (nearest
    centre, argmax, separability, NC1-NC4) is unchanged, while features as large as 1e300 no
    longer overflow inside (squared norms, inner products)."""
    m = np.abs(X).max(axis=(-2, -1))
    e = np.where(m > 0, np.frexp(m)[1], 0).astype(np.int64)
    return np.ldexp(X, -e[..., None, None]), e


def _finish(values, ok, batch_shape):
    """NaN where the input was not finite; a float for unbatched input."""
    values = np.where(ok, values, np.nan) if np.ndim(ok) else (values if ok else np.nan)
    values = np.asarray(values, dtype=np.float64).reshape(batch_shape)
    return float(values) if batch_shape == () else values


def _onehot(y, k):
    out = np.zeros((y.shape[0], k))
    out[np.arange(y.shape[0]), y] = 1.0
    return out


def _class_means(X, y, k, require_all=True):
    """Class means (..., K, p) and counts (K,)."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    if require_all and np.any(counts == 0):
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(
            f"y has no samples of class(es) {missing} of 0..{k - 1}; class means are undefined"
        )
    weights = _onehot(y, k) / np.maximum(counts, 1.0)  # (N, K)
    means = np.einsum("nk,...np->...kp", weights, X)
    return means, counts


def _strictly_best(scores, y):
    """Whether each sample's own class scores strictly above every other class: (..., N) bool."""
    with np.errstate(invalid="ignore"):
        return _margins(scores, y) > 0


def _logits(X, W, b):
    """Logits X W^T + b of shape (..., N, K)."""
    return np.matmul(X, np.swapaxes(W, -1, -2)) + b[..., None, :]


def _ncc_scores(X, means, present):
    """Scores x.mu_k - |mu_k|^2/2: the nearest class mean has the largest score; (..., N, K)."""
    center = means[..., present, :].mean(axis=-2, keepdims=True)  # reduces cancellation
    Xc, Mc = X - center, means - center
    scores = np.matmul(Xc, np.swapaxes(Mc, -1, -2)) - 0.5 * np.sum(Mc * Mc, axis=-1)[..., None, :]
    return np.where(present, scores, -np.inf)


def _logsumexp(z):
    m = z.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.sum(np.exp(z - m), axis=-1)) + m[..., 0]


# --------------------------------------------------------------------------------------------
# exact linear separability (linear program)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearSeparability:
    r"""Result of :func:`linear_separability`.

    Attributes:
        separable: whether an affine multi-class classifier labels every sample correctly with a
            positive margin (bool, or bool array of the batch shape).
        margin: the largest achievable margin :math:`t^* = \max \min_{j, k \ne y_j}
            [(w_{y_j} - w_k) \cdot X_j + b_{y_j} - b_k]` subject to :math:`\max_{k,i} |W_{ki}|
            \le 1` (entry-wise max norm), in the units of ``X``; 0 when not separable, inf when
            fewer than two classes have samples, NaN for non-finite features.
        W: classifier weights ``(K, p)`` (or ``(..., K, p)``) of the max-margin solution rescaled
            so that its smallest margin is exactly 1 (so :math:`\max|W_{ki}| = 1/t^*`); None
            (unbatched) or NaN (batched items) when not separable.
        b: the matching biases ``(K,)`` (or ``(..., K)``).
    """

    separable: Union[bool, np.ndarray]
    margin: Union[float, np.ndarray]
    W: Optional[np.ndarray] = field(default=None, repr=False)
    b: Optional[np.ndarray] = field(default=None, repr=False)


def _separability_lp(X, y, k, tol):
    """One LP; X (N, p) finite. Returns (separable, margin, W (K, p) or None, b (K,) or None)."""
    n, p = X.shape
    present = np.flatnonzero(np.bincount(y, minlength=k) > 0)
    if present.size < 2:  # one class: any classifier that prefers it separates with any margin
        W = np.zeros((k, p))
        b = -np.ones(k)
        b[present] = 0.0
        return True, np.inf, W, b
    # Work with the present classes only (an empty class's bias can be lowered at no cost), on
    # centred data scaled to max |entry| = 1 (the margin is translation invariant, scales with X).
    remap = -np.ones(k, dtype=np.int64)
    remap[present] = np.arange(present.size)
    c = present.size
    yc = remap[y]
    shift = X.mean(axis=0)
    Xc = X - shift
    scale = np.abs(Xc).max()
    if scale == 0.0:  # all points coincide, at least two labels: not separable
        return False, 0.0, None, None
    Xs = Xc / scale
    # Variables: W (c*p, row-major), b (c), t (1). Row (j, k != y_j):
    #   -(w_{y_j} - w_k).x_j - (b_{y_j} - b_k) + t <= 0.
    jj = np.repeat(np.arange(n), c - 1)
    other = np.tile(np.arange(c - 1), n)
    own = yc[jj]
    kk = other + (other >= own)  # the classes k != y_j in increasing order
    rows = np.arange(jj.size)
    nr = rows.size
    feat = np.arange(p)
    r_w = np.repeat(rows, 2 * p)
    col_own = (own[:, None] * p + feat[None, :])
    col_oth = (kk[:, None] * p + feat[None, :])
    c_w = np.concatenate([col_own, col_oth], axis=1).ravel()
    v_w = np.concatenate([-Xs[jj], Xs[jj]], axis=1).ravel()
    r_b = np.repeat(rows, 2)
    c_b = (c * p + np.stack([own, kk], axis=1)).ravel()
    v_b = np.tile([-1.0, 1.0], nr)
    r_t, c_t, v_t = rows, np.full(nr, c * p + c), np.ones(nr)
    entries = np.concatenate([v_w, v_b, v_t])
    ij = (np.concatenate([r_w, r_b, r_t]), np.concatenate([c_w, c_b, c_t]))
    A = sp.csr_matrix((entries, ij), shape=(nr, c * p + c + 1))
    cost = np.zeros(c * p + c + 1)
    cost[-1] = -1.0  # maximise t
    bounds = [(-1.0, 1.0)] * (c * p) + [(None, None)] * c + [(0.0, None)]
    res = linprog(cost, A_ub=A, b_ub=np.zeros(nr), bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(
            f"linear_separability: the LP solver failed ({res.status}): {res.message}"
        )
    Wc = np.clip(res.x[: c * p].reshape(c, p), -1.0, 1.0)
    bc = res.x[c * p : c * p + c]
    # The achieved margin, recomputed from the solution rather than read from the solver.
    t = float(np.min(_margins(Xs @ Wc.T + bc, yc)))
    if not t > tol:
        return False, 0.0, None, None
    # Back to the original units: margin t*scale with the same W; then rescale to margin 1.
    margin = t * scale
    W = np.zeros((k, p))
    b = np.zeros(k)
    W[present] = Wc / margin
    b[present] = (bc * scale - Wc @ shift) / margin
    if c < k:
        lowest = np.min(np.sum(X * W[y], axis=1) + b[y])
        b[np.setdiff1d(np.arange(k), present)] = lowest - 1.0
    return True, margin, W, b


def _margins(scores, y):
    """Own-class score minus the best other score, per sample: (..., N)."""
    idx = np.broadcast_to(y[:, None], scores.shape[:-1] + (1,))
    own = np.take_along_axis(scores, idx, axis=-1)[..., 0]
    others = scores.copy()
    np.put_along_axis(others, idx, -np.inf, axis=-1)
    return own - others.max(axis=-1)


def linear_separability(X, y, num_classes=None, tol=1e-7):
    r"""Exact multi-class linear separability by a linear program.

    The features are separable if there are :math:`w_k \in \mathbb{R}^p, b_k` with

    .. math:: w_{y_j} \cdot X_j + b_{y_j} \ge w_k \cdot X_j + b_k + 1 \quad \forall j,\ k \ne y_j,

    i.e. the affine classifier :math:`\arg\max_k (w_k \cdot x + b_k)` labels every sample correctly
    with a positive margin (Papyan, Han & Donoho, PNAS 2020; the order-parameter discussion in
    the README says why this is weaker than a vanishing training loss). The program solved is the
    max-margin LP

    .. math:: t^* = \max_{W, b, t} t \quad \text{s.t.} \quad (w_{y_j} - w_k) \cdot X_j
              + b_{y_j} - b_k \ge t,\ \ |W_{ki}| \le 1,\ t \ge 0,

    with scipy's HiGHS (``linprog(method="highs")``), on data centred and scaled to
    ``max |X - mean| = 1`` for conditioning. :math:`t^* \ge 0` always (W = 0 is feasible), and
    the data are separable iff :math:`t^* > 0`; numerically, iff the margin that the returned
    solution really achieves exceeds ``tol`` relative to the data's extent ``max |X - mean|``.
    The normalisation :math:`\max_{k,i}|W_{ki}| \le 1` keeps the program linear; its margin is
    not rotation invariant (for two points it equals their l1 distance).

    Degenerate cases: duplicate points with different labels, or all points equal, are not
    separable (margin 0); classes without samples are ignored (their biases are set low
    enough); with fewer than two classes present the data are trivially separable with
    margin inf.

    Args:
        X: features ``(N, p)`` or ``(..., N, p)``; the batch is looped over, one LP per item.
        y: labels ``(N,)`` in ``0..K-1``.
        num_classes: K (default ``y.max() + 1``).
        tol: relative margin threshold for "separable".

    Returns:
        :class:`LinearSeparability`; for batched input its fields are arrays of the batch shape
        (``W``: ``(..., K, p)``, ``b``: ``(..., K)``, NaN for items that are not separable).

    Cost: one LP with ``N (K-1)`` inequality constraints and ``K (p + 1) + 1`` variables.
    """
    X, batch_shape = _features(X)
    n, p = X.shape[-2:]
    y, k = _labels(y, n, num_classes)
    flat = X.reshape((-1, n, p))
    ok = np.isfinite(flat).all(axis=(1, 2))
    sep = np.zeros(flat.shape[0], dtype=bool)
    margin = np.full(flat.shape[0], np.nan)
    Ws = np.full((flat.shape[0], k, p), np.nan)
    bs = np.full((flat.shape[0], k), np.nan)
    for i in range(flat.shape[0]):
        if not ok[i]:
            continue
        # exact power-of-two prescaling: the LP's data stay in range for features up to 1e300
        Xi, ei = _unit_scale(flat[i])
        s, m, W, b = _separability_lp(Xi, y, k, tol)
        sep[i], margin[i] = s, np.ldexp(m, int(ei))
        if s:
            Ws[i], bs[i] = np.ldexp(W, -int(ei)), b
    if batch_shape == ():
        if not sep[0]:
            return LinearSeparability(False, float(margin[0]), None, None)
        return LinearSeparability(True, float(margin[0]), Ws[0], bs[0])
    return LinearSeparability(
        sep.reshape(batch_shape),
        margin.reshape(batch_shape),
        Ws.reshape(batch_shape + (k, p)),
        bs.reshape(batch_shape + (k,)),
    )


# --------------------------------------------------------------------------------------------
# cheap proxies
# --------------------------------------------------------------------------------------------
def ncc_accuracy(X, y, num_classes=None):
    r"""Training accuracy of the nearest-class-centre classifier.

    .. math:: \hat y_j = \arg\min_k |X_j - \mu_k|, \qquad
              \mathrm{acc} = \frac1N \sum_j [\hat y_j = y_j],

    with :math:`\mu_k` the class means of the same data (classes without samples are ignored). A
    sample counts as correct only if its own centre is strictly nearest.

    Args:
        X: features ``(..., N, p)``.  y: labels ``(N,)``.  num_classes: K.

    Returns:
        float, or array of the batch shape; NaN for non-finite items.
    """
    X, batch_shape = _features(X)
    y, k = _labels(y, X.shape[-2], num_classes)
    X, ok = _clean(X)
    X, _ = _unit_scale(X)  # scale invariant; keeps |x|^2 finite for features up to 1e300
    means, counts = _class_means(X, y, k, require_all=False)
    scores = _ncc_scores(X, means, counts > 0)
    return _finish(_strictly_best(scores, y).mean(axis=-1), ok, batch_shape)


def argmax_accuracy(X, y, W=None, b=None, num_classes=None):
    r"""Training accuracy of the logits' argmax.

    The logits are the features themselves (``p = K``) or, with a read-out, :math:`Z = X W^T + b`.
    A sample counts as correct only if its own logit is strictly the largest.

    Args:
        X: features ``(..., N, p)``.  y: labels ``(N,)``.
        W: optional read-out ``(K, p)`` or ``(..., K, p)``.
        b: optional bias ``(K,)`` or ``(..., K)``.
        num_classes: K (default: ``p`` without a read-out, else ``W.shape[-2]``).

    Returns:
        float, or array of the batch shape; NaN for non-finite items.
    """
    X, batch_shape = _features(X)
    Z, y, ok = _logits_of(X, y, W, b, num_classes, batch_shape, scale=True)
    return _finish(_strictly_best(Z, y).mean(axis=-1), ok, batch_shape)


def _logits_of(X, y, W, b, num_classes, batch_shape, scale=False):
    """Logits (..., N, K), labels and the finite mask. ``scale=True`` divides each item's
    features and bias by the same power of two (exact; the argmax is unchanged), so that huge
    but finite features give finite logits."""
    n, p = X.shape[-2:]
    if W is None:
        if b is not None:
            raise ValueError("b was given without W; pass the read-out W (K, p) too")
        k = p if num_classes is None else num_classes
        y, k = _labels(y, n, k)
        if k != p:
            raise ValueError(
                f"without a read-out W the features are the logits: X must have p = K = {k}; "
                f"got p = {p}"
            )
        X, ok = _clean(X)
        if scale:
            X, _ = _unit_scale(X)
        return X, y, ok
    W_arr = _to_numpy(W, "W")
    k = (W_arr.shape[-2] if W_arr.ndim >= 2 else None) if num_classes is None else num_classes
    if k is None:
        raise ValueError(f"W must have shape (K, p) or (..., K, p); got {W_arr.shape}")
    y, k = _labels(y, n, k)
    W, b = _readout(W_arr, b, batch_shape, k, p)
    X, ok = _clean(X)
    if scale:
        X, e = _unit_scale(X)
        b = np.ldexp(np.broadcast_to(b, batch_shape + (k,)), -e[..., None])
    Z = _logits(X, W, b)
    fin = np.isfinite(Z).all(axis=(-2, -1))
    return np.where(fin[..., None, None], Z, 0.0), y, ok & fin


def cross_entropy(X, y, W=None, b=None, num_classes=None):
    r"""Mean training cross-entropy of logits.

    .. math:: L = \frac1N \sum_j \Big[\log \sum_k e^{Z_{jk}} - Z_{j y_j}\Big],
              \qquad Z = X \ \text{(features are logits, } p = K) \ \text{ or } \ Z = X W^T + b,

    computed stably (log-sum-exp with the row maximum subtracted), so logits of size 1e3 or more
    give exact values. With a fixed read-out this is the training loss of the model, the order
    parameter of the phase transition of the locally elastic SDE (see the README).

    Args:
        X: features ``(..., N, p)``.  y: labels ``(N,)``.
        W: optional read-out ``(K, p)`` or ``(..., K, p)``.
        b: optional bias ``(K,)`` or ``(..., K)``.
        num_classes: K (default: ``p`` without a read-out, else ``W.shape[-2]``).

    Returns:
        float (nats), or array of the batch shape; NaN for non-finite items.
    """
    X, batch_shape = _features(X)
    Z, y, ok = _logits_of(X, y, W, b, num_classes, batch_shape)
    idx = np.broadcast_to(y[:, None], Z.shape[:-1] + (1,))
    own = np.take_along_axis(Z, idx, axis=-1)[..., 0]
    return _finish(np.mean(_logsumexp(Z) - own, axis=-1), ok, batch_shape)


def _probe_objective(theta, Xa, Y, l2, p):
    """Mean CE + l2/2 |W|^2 for theta (B, K, P); returns (value (B,), softmax (B, N, K))."""
    Z = np.matmul(Xa, np.swapaxes(theta, -1, -2))
    lse = _logsumexp(Z)
    ce = np.mean(lse - np.sum(Z * Y, axis=-1), axis=-1)
    S = np.exp(Z - lse[..., None])
    return ce + 0.5 * l2 * np.sum(theta[..., :p] ** 2, axis=(-2, -1)), ce, S


def _fit_probe(Xa, Y, l2, p, max_iter, tol):
    """Damped Newton for multinomial logistic regression, batched over the first axis."""
    bsz, n, P = Xa.shape
    k = Y.shape[1]
    d = k * P
    theta = np.zeros((bsz, k, P))
    pen = np.zeros((k, P))
    pen[:, :p] = l2
    # The common shift of all biases leaves the loss unchanged (a null direction of the
    # Hessian, orthogonal to the gradient); adding its projector makes the system regular
    # without changing the Newton step.
    v = np.zeros((k, P))
    v[:, p] = 1.0
    gauge = np.outer(v.ravel(), v.ravel()) / k + np.diag(pen.ravel())
    f, ce, S = _probe_objective(theta, Xa, Y, l2, p)
    active = np.ones(bsz, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        Xi, Si, th = Xa[idx], S[idx], theta[idx]
        G = np.matmul(np.swapaxes(Si - Y, -1, -2), Xi) / n + pen * th  # (b, K, P)
        Q = (Si[..., :, None] * Xi[..., None, :]).reshape(idx.size, n, d)  # s_k x_i
        H = -np.matmul(np.swapaxes(Q, -1, -2), Q) / n
        diag = np.matmul(np.swapaxes(Q, -1, -2), Xi).reshape(idx.size, k, P, P) / n
        H = H.reshape(idx.size, k, P, k, P)
        for c in range(k):
            H[:, c, :, c, :] += diag[:, c]
        H = H.reshape(idx.size, d, d) + gauge
        step = -np.linalg.solve(H, G.reshape(idx.size, d, 1))[..., 0]
        decrement = -np.sum(step * G.reshape(idx.size, d), axis=-1)
        done = decrement / 2 <= tol
        active[idx[done]] = False
        keep = ~done
        idx, step, decrement = idx[keep], step[keep].reshape(-1, k, P), decrement[keep]
        a = np.ones(idx.size)
        todo = np.ones(idx.size, dtype=bool)
        for _ls in range(40):  # backtracking (Armijo) line search, per item
            j = np.flatnonzero(todo)
            if j.size == 0:
                break
            cand = theta[idx[j]] + a[j, None, None] * step[j]
            fc, cec, Sc = _probe_objective(cand, Xa[idx[j]], Y, l2, p)
            good = fc <= f[idx[j]] - 0.25 * a[j] * decrement[j]
            g = j[good]
            theta[idx[g]], f[idx[g]] = cand[good], fc[good]
            ce[idx[g]], S[idx[g]] = cec[good], Sc[good]
            todo[g] = False
            a[j[~good]] *= 0.5
        active[idx[todo]] = False  # no decrease possible any more: at machine precision
    else:
        if active.any():
            warnings.warn(
                f"linear_probe_loss: Newton did not converge in {max_iter} iterations for "
                f"{int(active.sum())} item(s); the loss reported is the last iterate's",
                RuntimeWarning,
                stacklevel=3,
            )
    return ce


def linear_probe_loss(X, y, l2=1e-3, num_classes=None, max_iter=100, tol=1e-12):
    r"""Training cross-entropy of the best L2-regularised affine (softmax) probe.

    Fits, for each batch item,

    .. math:: (\hat W, \hat b) = \arg\min_{W, b} \frac1N \sum_j \ell(W X_j + b, y_j)
              + \frac{\lambda}{2} |W|_F^2, \qquad \ell(z, y) = \log\textstyle\sum_k e^{z_k} - z_y,

    (bias not penalised, :math:`\lambda` = ``l2`` > 0) and returns the data term
    :math:`\frac1N \sum_j \ell(\hat W X_j + \hat b, y_j)` without the penalty. It is a proxy for
    separability: for separable data the unregularised infimum is 0 and is not attained, while
    with :math:`\lambda > 0` the minimiser exists and the loss is small but positive, falling as
    the classes move apart. The value depends on the scale of ``X`` relative to
    :math:`\lambda` (scaling X by c acts like dividing :math:`\lambda` by :math:`c^2`), so compare
    values at the same ``l2`` and feature scale. Classes without samples are left out of the
    probe (their logits can be sent to :math:`-\infty` at no cost).

    The strictly convex problem is solved by a damped Newton method in float64, vectorised over
    the batch: about ``N K^2 (p+1)^2 + K^3 (p+1)^3`` operations per item and iteration; it stops
    when half the Newton decrement is below ``tol`` (nats).

    Args:
        X: features ``(..., N, p)``.  y: labels ``(N,)``.
        l2: ridge strength :math:`\lambda > 0` on the weights.
        num_classes: K.  max_iter: Newton iterations at most.  tol: stopping tolerance.

    Returns:
        float (nats), or array of the batch shape; 0 when fewer than two classes have samples;
        NaN for non-finite items.
    """
    X, batch_shape = _features(X)
    n, p = X.shape[-2:]
    y, k = _labels(y, n, num_classes)
    if not l2 > 0:
        raise ValueError(
            f"l2 must be > 0 (the unregularised probe has no minimiser on separable data); got {l2}"
        )
    X, ok = _clean(X)
    present = np.flatnonzero(np.bincount(y, minlength=k) > 0)
    if present.size < 2:
        return _finish(np.zeros(batch_shape), ok, batch_shape)
    remap = -np.ones(k, dtype=np.int64)
    remap[present] = np.arange(present.size)
    Y = _onehot(remap[y], present.size)
    flat = X.reshape((-1, n, p))
    Xa = np.concatenate([flat, np.ones(flat.shape[:-1] + (1,))], axis=-1)
    d = present.size * (p + 1)
    chunk = max(1, int(min(4e6 / d**2, 8e6 / (n * d))))
    out = np.empty(flat.shape[0])
    for s in range(0, flat.shape[0], chunk):
        out[s : s + chunk] = _fit_probe(Xa[s : s + chunk], Y, float(l2), p, max_iter, tol)
    return _finish(out.reshape(batch_shape), ok, batch_shape)


# --------------------------------------------------------------------------------------------
# neural collapse (Papyan, Han & Donoho, PNAS 2020)
# --------------------------------------------------------------------------------------------
def _nc_setup(X, y, num_classes):
    X, batch_shape = _features(X)
    y, k = _labels(y, X.shape[-2], num_classes)
    if k < 2:
        raise ValueError(f"neural-collapse metrics need K >= 2 classes; got num_classes = {k}")
    X, ok = _clean(X)
    X, e = _unit_scale(X)  # NC1-NC3 are scale invariant (NC4's bias is scaled alike)
    means, counts = _class_means(X, y, k, require_all=True)
    M = np.swapaxes(means - means.mean(axis=-2, keepdims=True), -1, -2)  # (..., p, K)
    return X, y, k, ok, batch_shape, means, counts, M, e


def nc1(X, y, num_classes=None):
    r"""NC1, within-class variability relative to between-class (Papyan, Han & Donoho, 2020).

    .. math:: \mathrm{NC1} = \frac1K \operatorname{Tr}\big(\Sigma_W \Sigma_B^{+}\big),\quad
              \Sigma_B = \frac1K \sum_k (\mu_k - \mu_G)(\mu_k - \mu_G)^T = \frac1K M M^T,\quad
              \Sigma_W = \frac1K \sum_k \frac{1}{n_k}
                  \sum_{j: y_j = k} (X_j - \mu_k)(X_j - \mu_k)^T,

    with :math:`\mu_k` the class means, :math:`\mu_G = \frac1K\sum_k \mu_k` and
    :math:`M = [\mu_k - \mu_G]_k` (``p x K``); for balanced classes :math:`\Sigma_W` is the
    average over all samples, as in the paper. :math:`^{+}` is the Moore-Penrose pseudo-inverse:
    with the SVD :math:`M = U S V^T`, :math:`\mathrm{NC1} = \sum_i u_i^T \Sigma_W u_i / s_i^2`
    over the at most ``min(K-1, p)`` singular values above ``max(p, K) * eps * s_max`` (the
    numpy rank tolerance; :math:`M` has rank at most K-1 because its columns sum to zero).
    Check: simplex-ETF means of norm r with isotropic noise :math:`s^2 I` give
    :math:`s^2 (K-1)^2 / (K r^2)`.

    Args:
        X: features ``(..., N, p)``.  y: labels ``(N,)``, every class with at least one sample.
        num_classes: K >= 2.

    Returns:
        float, or array of the batch shape; NaN when all class means coincide (no between-class
        variation: the ratio is undefined) and for non-finite items.
    """
    X, y, k, ok, batch_shape, means, counts, M, e = _nc_setup(X, y, num_classes)
    return _finish(_nc1_value(X, y, k, means, counts, M), ok, batch_shape)


def _nc1_value(X, y, k, means, counts, M):
    p = X.shape[-1]
    U, s, _ = np.linalg.svd(M, full_matrices=False)  # U (..., p, r0), s (..., r0)
    r = min(k - 1, p)
    U, s = U[..., :r], s[..., :r]
    smax = s[..., :1]
    keep = s > max(p, k) * np.finfo(np.float64).eps * smax
    dev = X - means[..., y, :]  # (..., N, p)
    proj = np.matmul(dev, U)  # (..., N, r)
    w = _onehot(y, k) / counts  # class-balanced weights
    var = np.einsum("nk,...nr->...r", w, proj**2) / k  # u_i^T Sigma_W u_i
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(keep, var / np.where(keep, s, 1.0) ** 2, 0.0)
    return np.where(smax[..., 0] > 0, terms.sum(axis=-1), np.nan)


@dataclass(frozen=True)
class NC2:
    r"""NC2 terms (see :func:`nc2`); floats or arrays of the batch shape."""

    equinorm: Union[float, np.ndarray]
    equiangularity: Union[float, np.ndarray]
    etf_angle: Union[float, np.ndarray]


def _nc2_terms(M, k):
    norms = np.linalg.norm(M, axis=-2)  # (..., K)
    with np.errstate(divide="ignore", invalid="ignore"):
        equinorm = norms.std(axis=-1) / norms.mean(axis=-1)
        unit = M / norms[..., None, :]
        cos = np.matmul(np.swapaxes(unit, -1, -2), unit)  # (..., K, K)
    iu = np.triu_indices(k, 1)
    pair = cos[..., iu[0], iu[1]]  # (..., K(K-1)/2)
    return equinorm, pair.std(axis=-1), np.abs(pair + 1.0 / (k - 1)).mean(axis=-1)


def nc2(X, y, num_classes=None):
    r"""NC2, convergence of the centred class means to a simplex ETF (Papyan, Han & Donoho, 2020).

    With :math:`m_k = \mu_k - \mu_G` (:math:`\mu_G` the mean of the class means) and the pairwise
    cosines :math:`c_{kl} = m_k \cdot m_l / (|m_k| |m_l|)`, :math:`k < l`:

    * ``equinorm`` = :math:`\operatorname{std}_k |m_k| / \operatorname{mean}_k |m_k|`
      (coefficient of variation, population std);
    * ``equiangularity`` = :math:`\operatorname{std}_{k<l} c_{kl}` (population std);
    * ``etf_angle`` = :math:`\operatorname{mean}_{k<l} |c_{kl} + 1/(K-1)|`.

    All three are 0 for a simplex equiangular tight frame (and always 0 for K = 2, where the two
    centred means are opposite).

    Args:
        X: features ``(..., N, p)``.  y: labels ``(N,)``, every class present.  num_classes: K >= 2.

    Returns:
        :class:`NC2` of floats or arrays of the batch shape; NaN where a centred class mean is 0
        and for non-finite items.
    """
    X, y, k, ok, batch_shape, means, counts, M, e = _nc_setup(X, y, num_classes)
    terms = _nc2_terms(M, k)
    return NC2(*(_finish(t, ok, batch_shape) for t in terms))


def _nc_readout(W, b, batch_shape, k, p, center_W):
    if W is None:
        raise ValueError(
            f"W (read-out, shape (K, p) = ({k}, {p})) is required; for logit features use "
            "numpy.eye(K)"
        )
    W, b = _readout(W, b, batch_shape, k, p)
    if center_W:
        W = W - W.mean(axis=-2, keepdims=True)
    return W, b


def nc3(X, y, W, num_classes=None, center_W=False):
    r"""NC3, self-duality of the read-out and the centred class means (Papyan, Han & Donoho).

    .. math:: \mathrm{NC3} = \Big| \frac{W^T}{|W|_F} - \frac{M}{|M|_F} \Big|_F^2,

    ``W`` the ``K x p`` read-out, :math:`M = [\mu_k - \mu_G]` (``p x K``). Between 0 (self-dual)
    and 4. With ``center_W=True`` the mean row of ``W`` is subtracted first; the softmax is
    invariant to adding one vector to every row, so this is the natural choice for a read-out
    without that freedom removed -- in particular the identity read-out of logit features
    (``p = K``, ``W = numpy.eye(K)``), whose centred form is itself a simplex ETF. The paper's
    definition is ``center_W=False``.

    Args:
        X: features ``(..., N, p)``.  y: labels ``(N,)``, every class present.
        W: read-out ``(K, p)`` or ``(..., K, p)`` (broadcast over the batch).
        num_classes: K (default ``y.max() + 1``).  center_W: see above.

    Returns:
        float, or array of the batch shape; NaN when M or W is 0, and for non-finite items.
    """
    X, y, k, ok, batch_shape, means, counts, M, e = _nc_setup(X, y, num_classes)
    W, _ = _nc_readout(W, None, batch_shape, k, X.shape[-1], center_W)
    return _finish(_nc3_value(M, W), ok, batch_shape)


def _nc3_value(M, W):
    with np.errstate(divide="ignore", invalid="ignore"):
        Wt = np.swapaxes(W, -1, -2) / np.linalg.norm(W, axis=(-2, -1))[..., None, None]
        Mn = M / np.linalg.norm(M, axis=(-2, -1))[..., None, None]
        return np.sum((Wt - Mn) ** 2, axis=(-2, -1))


def _nc4_value(X, y, means, W, b, k):
    pred = np.argmax(_logits(X, W, b), axis=-1)
    near = np.argmax(_ncc_scores(X, means, np.ones(k, dtype=bool)), axis=-1)
    return np.mean(pred != near, axis=-1)


def nc4(X, y, W, b=None, num_classes=None):
    r"""NC4, disagreement of the read-out with the nearest class centre (Papyan, Han & Donoho).

    .. math:: \mathrm{NC4} = \frac1N \sum_j \Big[\arg\max_k (W X_j + b)_k
              \ne \arg\min_k |X_j - \mu_k|\Big],

    ties going to the lowest class index in both (numpy's ``argmax`` convention). For logit
    features (``p = K``) the read-out is the identity, ``W = numpy.eye(K)``.

    Args:
        X: features ``(..., N, p)``.  y: labels ``(N,)``, every class present.
        W: read-out ``(K, p)`` or ``(..., K, p)``.  b: bias ``(K,)`` or ``(..., K)`` (default 0).
        num_classes: K.

    Returns:
        float in [0, 1], or array of the batch shape; NaN for non-finite items.
    """
    X, y, k, ok, batch_shape, means, counts, M, e = _nc_setup(X, y, num_classes)
    W, b = _nc_readout(W, b, batch_shape, k, X.shape[-1], False)
    b = np.ldexp(np.broadcast_to(b, batch_shape + (k,)), -e[..., None])
    return _finish(_nc4_value(X, y, means, W, b, k), ok, batch_shape)


@dataclass(frozen=True)
class NeuralCollapse:
    """All neural-collapse measures (see :func:`neural_collapse`); nc3, nc4 None without W."""

    nc1: Union[float, np.ndarray]
    equinorm: Union[float, np.ndarray]
    equiangularity: Union[float, np.ndarray]
    etf_angle: Union[float, np.ndarray]
    nc3: Optional[Union[float, np.ndarray]] = None
    nc4: Optional[Union[float, np.ndarray]] = None

    def as_dict(self):
        """The measures as a plain dict (e.g. for a pandas row)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def neural_collapse(X, y, W=None, b=None, num_classes=None, center_W=False):
    r"""NC1, the three NC2 terms and, given a read-out ``W``, NC3 and NC4 at once.

    Definitions as in :func:`nc1`, :func:`nc2`, :func:`nc3`, :func:`nc4` (Papyan, Han & Donoho,
    PNAS 2020), sharing one computation of the class means. For logit features (``p = K``)
    the natural read-out is the identity: pass ``W=numpy.eye(K)`` (and ``center_W=True`` for
    NC3, see :func:`nc3`); it is not assumed when ``W`` is None.

    Args:
        X: features ``(..., N, p)``.  y: labels ``(N,)``, every class present.
        W: optional read-out ``(K, p)`` or ``(..., K, p)``.  b: optional bias ``(K,)``/``(..., K)``.
        num_classes: K >= 2.  center_W: centre the rows of W for NC3 (not for NC4).

    Returns:
        :class:`NeuralCollapse` of floats or arrays of the batch shape.
    """
    if W is None and b is not None:
        raise ValueError("b was given without W; pass the read-out W (K, p) too")
    X, y, k, ok, batch_shape, means, counts, M, e = _nc_setup(X, y, num_classes)
    values = [_nc1_value(X, y, k, means, counts, M), *_nc2_terms(M, k)]
    if W is not None:
        Wc, _ = _nc_readout(W, None, batch_shape, k, X.shape[-1], center_W)
        Wr, br = _nc_readout(W, b, batch_shape, k, X.shape[-1], False)
        br = np.ldexp(np.broadcast_to(br, batch_shape + (k,)), -e[..., None])
        values += [_nc3_value(M, Wc), _nc4_value(X, y, means, Wr, br, k)]
    return NeuralCollapse(*(_finish(v, ok, batch_shape) for v in values))


def order_parameters(solution, W=None, b=None, lp=True, lp_every: int = 1):
    r"""The order parameters of the separability transition over time, one tidy table.

    For every recorded time and run of a :class:`lesde.Solution` with full states (or a tuple
    ``(ts, states (T, B, N, p), labels)``), the table has:

    * ``train_loss`` and ``accuracy``: training cross-entropy and argmax accuracy of the model's
      own read-out -- the logits are the features themselves when p = K, else ``X W^T + b``
      (the read-out of a ``CrossEntropyReadout`` field is taken from the solution's parameters
      when W is not given). This is the order parameter of the phase transition
      (Zhang, Wang & Su, NeurIPS 2021): features are "separable" when this loss goes to 0.
    * ``ncc_accuracy``: nearest-class-centre accuracy (a cheap geometric proxy);
    * ``lp_separable``, ``lp_margin``: separability by *any* affine classifier (the LP of
      :func:`linear_separability`; every ``lp_every``-th time, NaN elsewhere). A weaker notion:
      with beta > alpha the features can be LP-separable by a reversed classifier while the
      training loss diverges.

    Returns a pandas DataFrame with columns ``t, run, train_loss, accuracy, ncc_accuracy,
    lp_separable, lp_margin``.
    """
    import pandas as pd

    if isinstance(solution, tuple):
        ts, states, labels = solution
    else:
        ts, states, labels = solution.ts, solution.states, solution.labels
        if states is None:
            raise ValueError("order_parameters needs full states: simulate with record='full'")
        field = solution.params.get("field", {}) if isinstance(solution.params, dict) else {}
        if W is None and field.get("W") is not None:
            W, b = np.asarray(field["W"]), None if field.get("b") is None else np.asarray(field["b"])
    states = _to_numpy(states, "states")
    if states.ndim != 4:
        raise ValueError(f"states must have shape (T, B, N, p), got {states.shape}")
    ts = np.asarray(ts, dtype=float)
    T, B = states.shape[:2]
    if ts.shape != (T,):
        raise ValueError(f"ts must have shape (T,) = ({T},), got {ts.shape}")
    if W is None and int(np.max(labels)) + 1 > states.shape[-1]:
        raise ValueError(f"features of dimension p = {states.shape[-1]} are not logits for "
                         f"K = {int(np.max(labels)) + 1} classes: give the read-out W")
    K = W.shape[0] if W is not None else states.shape[-1]
    loss = np.asarray(cross_entropy(states, labels, W=W, b=b, num_classes=K))
    acc = np.asarray(argmax_accuracy(states, labels, W=W, b=b, num_classes=K))
    ncc = np.asarray(ncc_accuracy(states, labels, num_classes=K))
    sep = np.full((T, B), np.nan)
    margin = np.full((T, B), np.nan)
    if lp:
        if int(lp_every) < 1:
            raise ValueError(f"lp_every must be a positive integer, got {lp_every}")
        for i in range(0, T, int(lp_every)):
            res = linear_separability(states[i], labels, num_classes=K)
            sep[i] = np.asarray(res.separable, dtype=float)
            margin[i] = res.margin
    return pd.DataFrame({"t": np.repeat(ts, B), "run": np.tile(np.arange(B), T),
                         "train_loss": loss.ravel(), "accuracy": acc.ravel(),
                         "ncc_accuracy": ncc.ravel(), "lp_separable": sep.ravel(),
                         "lp_margin": margin.ravel()})
