r"""The locally elastic SDE: impact schedules, impact matrices, drift fields and the SDE.

Canonical form (Zhang, Wang & Su, NeurIPS 2021, arXiv 2110.05960; the package's choice of
normalisation, see README "Package choices")::

    dX_j = (1/N) \sum_{j'} E(t)[y_j, y_{j'}] G(X_{j'}, y_{j'}; t) dt  +  noise_j

for samples j = 1..N with labels y_j in {0..K-1} and features X_j in R^p. ``E(t)`` is the K x K
impact (elasticity) matrix, ``G(x, k) = -dl(x, k)/dx`` the drift field. Because E depends on the
two labels only, the drift needs only the K per-class sums S_k = sum_{y_j' = k} G(X_j', k)::

    drift_j = (1/N) sum_k E[y_j, k] S_k          O(N p + K^2 p) work, never an N x N matrix.

Two noise models (background.md, "Noise: additive, and the noise of SGD itself"):

* additive: ``sigma(t) dW_j``, independent per sample and coordinate;
* SGD sampling noise with learning rate h: over dt,
  ``sqrt(h dt / N) sum_{j'} (E[y_j, y_j'] G_j' - drift_j) zeta_j'`` with one shared Gaussian
  ``zeta_j'`` per drawn sample. It needs only the per-class sums of ``G_j' zeta_j'`` and the sum
  of zeta, and vanishes when G does.

Shapes: states are ``(B, N, p)`` (B independent runs or parameter points). Internally the
solvers keep a *feature-major, class-sorted* layout ``(B, p, N)`` in which class k occupies a
contiguous block of the last axis; every reduction then runs over a long contiguous axis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[float, int, Sequence[float], np.ndarray, torch.Tensor]

__all__ = [
    "Schedule",
    "Constant",
    "PowerLaw",
    "FunctionSchedule",
    "as_schedule",
    "Impacts",
    "DriftField",
    "Identity",
    "LabelProjection",
    "CrossEntropy",
    "CrossEntropyReadout",
    "CallableField",
    "make_field",
    "NoiseSpec",
    "LESDE",
]


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ============================================================================================
# Schedules: scalar (or batched, shape (B,)) functions of time with their integrals
# ============================================================================================
class Schedule:
    """A non-random function of time ``a(t)``, scalar or batched with shape ``(B,)``.

    ``integral(t)`` returns ``A(t) = int_0^t a(s) ds`` (closed form where one exists, adaptive
    quadrature otherwise). ``batch_size`` is ``None`` for a scalar schedule.
    """

    constant = False
    batch_size: Optional[int] = None

    def __call__(self, t: float) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def integral(self, t: float) -> np.ndarray:
        from scipy.integrate import quad_vec

        value, _ = quad_vec(lambda s: np.asarray(self(s), dtype=float), 0.0, float(t),
                            epsabs=1e-13, epsrel=1e-11)
        return np.asarray(value, dtype=float)

    def describe(self) -> dict:
        return {"kind": type(self).__name__}


def _check_values(name: str, value: np.ndarray, nonneg: bool = False) -> np.ndarray:
    value = np.asarray(value, dtype=float)
    if value.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-d batch of shape (B,), got shape {value.shape}")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    if nonneg and np.any(value < 0):
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


class Constant(Schedule):
    """``a(t) = value`` (scalar or shape ``(B,)``); ``A(t) = value * t``."""

    constant = True

    def __init__(self, value: ArrayLike, name: str = "value", nonneg: bool = False):
        self.value = _check_values(name, _as_numpy(value), nonneg)
        self.batch_size = None if self.value.ndim == 0 else self.value.shape[0]

    def __call__(self, t):
        return self.value

    def integral(self, t):
        return self.value * float(t)

    def describe(self):
        return {"kind": "Constant", "value": self.value.tolist()}


class PowerLaw(Schedule):
    r"""``a(t) = a0 (1 + t/t0)^(-r)``, the decaying impact of the paper.

    ``A(t) = a0 t0 [(1 + t/t0)^(1-r) - 1]/(1-r)`` (``a0 t0 log(1 + t/t0)`` at r = 1), which
    diverges as t -> infinity iff r <= 1. Each of a0, r may be batched (shape ``(B,)``).
    """

    def __init__(self, a0: ArrayLike, r: ArrayLike, t0: float = 1.0):
        self.a0 = _check_values("a0", _as_numpy(a0))
        self.r = _check_values("r", _as_numpy(r))
        if not (np.isfinite(t0) and t0 > 0):
            raise ValueError(f"t0 must be positive and finite, got {t0}")
        self.t0 = float(t0)
        shape = np.broadcast_shapes(self.a0.shape, self.r.shape)
        self.batch_size = None if len(shape) == 0 else shape[0]

    def __call__(self, t):
        return self.a0 * (1.0 + float(t) / self.t0) ** (-self.r)

    def integral(self, t):
        u = 1.0 + float(t) / self.t0
        one_minus_r = 1.0 - self.r
        with np.errstate(divide="ignore", invalid="ignore"):
            general = (u ** one_minus_r - 1.0) / np.where(one_minus_r == 0, 1.0, one_minus_r)
        return self.a0 * self.t0 * np.where(np.abs(one_minus_r) < 1e-12, math.log(u), general)

    def describe(self):
        return {"kind": "PowerLaw", "a0": self.a0.tolist(), "r": self.r.tolist(), "t0": self.t0}


class FunctionSchedule(Schedule):
    """A user function ``fn(t) -> float or array (B,)``; its integral by adaptive quadrature."""

    def __init__(self, fn: Callable[[float], ArrayLike], name: str = "schedule", nonneg: bool = False):
        if not callable(fn):
            raise ValueError(f"{name} must be callable")
        self.fn, self.name, self.nonneg = fn, name, nonneg
        v0 = self(0.0)
        self.batch_size = None if v0.ndim == 0 else v0.shape[0]

    def __call__(self, t):
        return _check_values(f"{self.name}(t={float(t):g})", _as_numpy(self.fn(float(t))), self.nonneg)

    def describe(self):
        return {"kind": "FunctionSchedule", "fn": getattr(self.fn, "__name__", repr(self.fn))}


def as_schedule(x, name: str = "value", nonneg: bool = False) -> Schedule:
    """Turn a float, a ``(B,)`` array, a callable of t, or a Schedule into a Schedule."""
    if isinstance(x, Schedule):
        return x
    if callable(x) and not isinstance(x, (np.ndarray, torch.Tensor)):
        return FunctionSchedule(x, name=name, nonneg=nonneg)
    return Constant(x, name=name, nonneg=nonneg)


def _batch_of(*sizes: Optional[int]) -> Optional[int]:
    found = {s for s in sizes if s is not None and s != 1}
    if len(found) > 1:
        raise ValueError(f"inconsistent batch sizes {sorted(found)}: batched parameters must share B")
    if found:
        return found.pop()
    return 1 if any(s == 1 for s in sizes) else None


# ============================================================================================
# The impact matrix
# ============================================================================================
class Impacts:
    r"""The K x K impact (elasticity) matrix E(t), possibly batched to ``(B, K, K)``.

    Build it from any matrix (``Impacts(E)``, E of shape ``(K, K)`` or ``(B, K, K)``, or a
    callable ``t -> E``), or from intra/inter-class impacts::

        E = (alpha - beta) I + beta 1 1^T        (Impacts.intra_inter(alpha, beta, K))

    with eigenvalues ``alpha + (K-1) beta`` (all-ones direction) and ``alpha - beta``
    (K-1 times). alpha and beta may be floats, ``(B,)`` arrays, callables of t or Schedules
    (e.g. :class:`PowerLaw`). "Locally elastic" means alpha > beta.
    """

    def __init__(self, E=None, *, _alpha: Optional[Schedule] = None,
                 _beta: Optional[Schedule] = None, _K: Optional[int] = None):
        self.alpha = _alpha
        self.beta = _beta
        self._fn = None
        if _alpha is not None:
            self.K = int(_K)
            self.batch_size = _batch_of(_alpha.batch_size, _beta.batch_size)
            self.constant = _alpha.constant and _beta.constant
            self._matrix0 = self._intra_inter_matrix(0.0)
        elif callable(E) and not isinstance(E, (np.ndarray, torch.Tensor)):
            self._fn = E
            m0 = self._check_matrix(_as_numpy(E(0.0)), "E(0)")
            self.K = m0.shape[-1]
            self.batch_size = m0.shape[0] if m0.ndim == 3 else None
            self.constant = False
            self._matrix0 = m0
        else:
            m0 = self._check_matrix(_as_numpy(E), "E")
            self.K = m0.shape[-1]
            self.batch_size = m0.shape[0] if m0.ndim == 3 else None
            self.constant = True
            self._matrix0 = m0
        self._torch_cache = {}

    @staticmethod
    def _check_matrix(m: np.ndarray, name: str) -> np.ndarray:
        m = np.asarray(m, dtype=float)
        if m.ndim not in (2, 3) or m.shape[-1] != m.shape[-2]:
            raise ValueError(f"impact matrix {name} must have shape (K, K) or (B, K, K), got {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError(f"impact matrix {name} is not finite")
        return m

    @classmethod
    def intra_inter(cls, alpha, beta, K: int) -> "Impacts":
        """``E = (alpha - beta) I + beta 11^T`` for K classes (alpha intra-, beta inter-class)."""
        if int(K) != K or K < 1:
            raise ValueError(f"K must be a positive integer, got {K}")
        return cls(_alpha=as_schedule(alpha, "alpha"), _beta=as_schedule(beta, "beta"), _K=int(K))

    @property
    def is_intra_inter(self) -> bool:
        return self.alpha is not None

    def _intra_inter_matrix(self, t: float) -> np.ndarray:
        a = np.atleast_1d(self.alpha(t))[:, None, None]
        b = np.atleast_1d(self.beta(t))[:, None, None]
        eye = np.eye(self.K)
        m = (a - b) * eye + b * np.ones((self.K, self.K))
        return m if self.batch_size is not None else m[0]

    def matrix(self, t: float = 0.0) -> np.ndarray:
        """E(t) as a numpy array, ``(K, K)`` or ``(B, K, K)``."""
        if self.constant:
            return self._matrix0
        if self._fn is not None:
            return self._check_matrix(_as_numpy(self._fn(float(t))), f"E(t={float(t):g})")
        return self._intra_inter_matrix(t)

    def torch_matrix(self, t: float, dtype, device) -> torch.Tensor:
        """E(t) as a tensor of shape ``(B or 1, K, K)`` (cached when E is constant)."""
        if self.constant:
            key = (dtype, str(device))
            if key not in self._torch_cache:
                m = torch.as_tensor(self._matrix0, dtype=dtype, device=device)
                self._torch_cache[key] = m if m.dim() == 3 else m.unsqueeze(0)
            return self._torch_cache[key]
        m = torch.as_tensor(self.matrix(t), dtype=dtype, device=device)
        return m if m.dim() == 3 else m.unsqueeze(0)

    def integrals(self, t: float):
        """``(A(t), B(t))``, the integrated intra- and inter-class impacts (intra/inter form)."""
        if not self.is_intra_inter:
            raise ValueError("integrals are defined for intra/inter impacts; build with Impacts.intra_inter")
        return self.alpha.integral(t), self.beta.integral(t)

    def describe(self) -> dict:
        if self.is_intra_inter:
            return {"kind": "intra_inter", "K": self.K, "alpha": self.alpha.describe(),
                    "beta": self.beta.describe()}
        if self._fn is not None:
            return {"kind": "function", "K": self.K}
        return {"kind": "matrix", "E": self._matrix0.tolist()}


# ============================================================================================
# Drift fields G(x, k) = -dl(x, k)/dx
# ============================================================================================
class DriftField:
    """A drift field ``G(x, k)``, applied sample-wise.

    Public call: ``field(x, y)`` with x of shape ``(..., N, p)`` and labels ``y`` of shape
    ``(N,)`` returns G of the same shape as x. Subclasses implement ``_fm(x, onehot, t)`` on the
    feature-major layout: x of shape ``(B, p, M)``, ``onehot`` of shape ``(1 or B, K, M)``.
    ``linear`` marks fields for which :mod:`lesde.theory` has exact moments.
    """

    name = "field"
    linear = False

    def check(self, p: int, K: int) -> None:
        """Raise ValueError when the field cannot act on p-dim features with K classes."""

    def _fm(self, x: torch.Tensor, onehot: torch.Tensor, t: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _sums(self, x: torch.Tensor, lay: "_Layout", t: float) -> torch.Tensor:
        """Per-class sums ``S[..., k] = sum_{y_j = k} G(X_j, k)`` of shape (B, p, K) from the
        sorted feature-major state; fields may override it to skip materialising G."""
        return lay.class_sums(self._fm(x, lay.onehot, t))

    def __call__(self, x, y, t: float = 0.0, num_classes: Optional[int] = None):
        xt = torch.as_tensor(x)
        yt = torch.as_tensor(y, dtype=torch.long, device=xt.device)
        if xt.dim() < 2 or yt.dim() != 1 or xt.shape[-2] != yt.shape[0]:
            raise ValueError(f"x must have shape (..., N, p) and y shape (N,), got {tuple(xt.shape)} "
                             f"and {tuple(yt.shape)}")
        K = int(num_classes if num_classes is not None else int(yt.max()) + 1)
        self.check(xt.shape[-1], K)
        lead = xt.shape[:-2]
        xb = xt.reshape(-1, *xt.shape[-2:]).transpose(1, 2)
        onehot = torch.nn.functional.one_hot(yt, K).to(xt.dtype).T.unsqueeze(0)
        g = self._fm(xb, onehot, t).transpose(1, 2)
        g = g.reshape(*lead, *xt.shape[-2:])
        return g.numpy() if isinstance(x, np.ndarray) else g

    def describe(self) -> dict:
        return {"name": self.name}


class Identity(DriftField):
    """The I-model, ``G(x, k) = x``: linear; class means grow exponentially (see theory)."""

    name = "identity"
    linear = True

    def _fm(self, x, onehot, t):
        return x


class LabelProjection(DriftField):
    r"""The L-model, ``G(x, k) = P_k x`` with ``P_k`` the orthogonal projector on
    ``d_k = e_k - 1/K`` (requires p = K): ``P_k x = d_k (d_k . x)/|d_k|^2``, ``|d_k|^2 = 1 - 1/K``.
    """

    name = "label_projection"
    linear = True

    def check(self, p, K):
        if p != K:
            raise ValueError(f"the label-projection field needs p = K, got p={p}, K={K}")

    def _fm(self, x, onehot, t):
        K = onehot.shape[1]
        d = onehot - 1.0 / K                                   # (1|B, K, M)
        coef = (x * onehot).sum(1, keepdim=True) - x.mean(1, keepdim=True)
        return d * (coef / (1.0 - 1.0 / K))


def _softmax_fm(z: torch.Tensor) -> torch.Tensor:
    # softmax over axis 1 written from max/exp/sum: over short rows this is several times
    # faster than torch.softmax on the strided axis (benchmarks/README.md).
    e = torch.exp(z - z.amax(1, keepdim=True))
    return e.div_(e.sum(1, keepdim=True))


class CrossEntropy(DriftField):
    """Cross-entropy on logits (p = K): ``G(x, k) = e_k - softmax(x)``; bounded, nonlinear."""

    name = "cross_entropy"

    def check(self, p, K):
        if p != K:
            raise ValueError(f"the cross-entropy-on-logits field needs p = K, got p={p}, K={K}")

    def _fm(self, x, onehot, t):
        return torch.sub(onehot, _softmax_fm(x))

    def _sums(self, x, lay, t):
        # S = diag(n_k) - per-class sums of softmax: G itself is never formed.
        e = lay.buffer("softmax", x.shape)
        torch.sub(x, x.amax(1, keepdim=True), out=e).exp_()
        e.div_(e.sum(1, keepdim=True))
        return lay.diag_counts - lay.class_sums(e)


class CrossEntropyReadout(DriftField):
    """Cross-entropy through a fixed read-out W (K x p) and bias b:
    ``G(x, k) = W^T (e_k - softmax(W x + b))``."""

    name = "cross_entropy_readout"

    def __init__(self, W, b=None):
        W = torch.as_tensor(W, dtype=torch.float64)
        if W.dim() != 2:
            raise ValueError(f"read-out W must have shape (K, p), got {tuple(W.shape)}")
        if not torch.isfinite(W).all():
            raise ValueError("read-out W is not finite")
        self.W = W
        self.b = None if b is None else torch.as_tensor(b, dtype=torch.float64).reshape(-1)
        if self.b is not None and self.b.shape[0] != W.shape[0]:
            raise ValueError(f"bias b must have shape (K,) = ({W.shape[0]},), got {tuple(self.b.shape)}")
        self._cache = {}

    def check(self, p, K):
        if tuple(self.W.shape) != (K, p):
            raise ValueError(f"read-out W has shape {tuple(self.W.shape)}, expected (K, p) = ({K}, {p})")

    def _params(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._cache:
            W = self.W.to(dtype=dtype, device=device)
            b = None if self.b is None else self.b.to(dtype=dtype, device=device)[:, None]
            self._cache[key] = (W, W.T.contiguous(), b)
        return self._cache[key]

    def _fm(self, x, onehot, t):
        W, Wt, b = self._params(x.dtype, x.device)
        z = torch.matmul(W, x)
        if b is not None:
            z = z + b
        return torch.matmul(Wt, onehot - _softmax_fm(z))

    def describe(self):
        return {"name": self.name, "W": self.W.tolist(),
                "b": None if self.b is None else self.b.tolist()}


class CallableField(DriftField):
    """A user drift field ``fn(x, y, t) -> G`` with x of shape ``(B, M, p)`` and y ``(M,)`` or
    ``(B, M)`` labels. It must act sample-wise (row j of G depends on x[:, j], y[j] only)."""

    name = "callable"

    def __init__(self, fn: Callable, linear: bool = False):
        if not callable(fn):
            raise ValueError("the drift field must be callable")
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def _fm(self, x, onehot, t):
        y = onehot.argmax(1)
        y = y[0] if y.shape[0] == 1 else y
        g = torch.as_tensor(self.fn(x.transpose(1, 2), y, t), dtype=x.dtype, device=x.device)
        if g.shape != x.transpose(1, 2).shape:
            raise ValueError(f"the drift field returned shape {tuple(g.shape)}, expected "
                             f"{tuple(x.transpose(1, 2).shape)}")
        return g.transpose(1, 2)


_FIELDS = {"identity": Identity, "i": Identity, "label_projection": LabelProjection,
           "l": LabelProjection, "cross_entropy": CrossEntropy, "ce": CrossEntropy}


def make_field(field) -> DriftField:
    """A DriftField from an instance, a name (identity/I, label_projection/L, cross_entropy/CE)
    or a callable ``fn(x, y, t)``."""
    if isinstance(field, DriftField):
        return field
    if isinstance(field, str):
        key = field.lower().replace("-", "_")
        if key not in _FIELDS:
            raise ValueError(f"unknown drift field {field!r}; known: identity, label_projection, "
                             f"cross_entropy (or a DriftField / callable)")
        return _FIELDS[key]()
    if callable(field):
        return CallableField(field)
    raise ValueError(f"cannot make a drift field from {field!r}")


# ============================================================================================
# Noise
# ============================================================================================
@dataclass(frozen=True)
class NoiseSpec:
    """Which diffusion: ``kind`` in {"additive", "sgd", "both", "none"}, learning rate ``lr``
    (the h of the SGD noise)."""

    kind: str = "additive"
    lr: Optional[float] = None

    def __post_init__(self):
        if self.kind not in ("additive", "sgd", "both", "none"):
            raise ValueError(f"noise must be one of additive, sgd, both, none; got {self.kind!r}")
        if self.kind in ("sgd", "both"):
            if self.lr is None or not (np.isfinite(self.lr) and self.lr > 0):
                raise ValueError(f"SGD sampling noise needs a positive finite learning rate lr, got {self.lr}")

    @property
    def additive(self) -> bool:
        return self.kind in ("additive", "both")

    @property
    def sgd(self) -> bool:
        return self.kind in ("sgd", "both")


# ============================================================================================
# Labels, layout and the per-class-sum drift
# ============================================================================================
class _Layout:
    """Class-sorted, feature-major layout of N samples for one (dtype, device)."""

    def __init__(self, labels: torch.Tensor, K: int, dtype, device):
        self.N = labels.shape[0]
        self.K = K
        self.order = torch.argsort(labels, stable=True).to(device)
        self.inverse = torch.argsort(self.order)
        self.sorted_labels = labels.to(device)[self.order]
        counts = torch.bincount(labels.cpu(), minlength=K)
        self.counts = counts.tolist()
        self.bounds = np.concatenate([[0], np.cumsum(self.counts)]).tolist()
        self.balanced = len(set(self.counts)) == 1
        self.n = self.counts[0] if self.balanced else None
        self.onehot = torch.nn.functional.one_hot(self.sorted_labels, K).to(dtype).T.unsqueeze(0)
        self.diag_counts = torch.diag(counts.to(dtype)).to(device).unsqueeze(0)
        self.dtype, self.device = dtype, device
        self._buffers = {}

    def buffer(self, name: str, shape) -> torch.Tensor:
        """A reusable work tensor (avoids re-allocating large temporaries every step)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = torch.empty(tuple(shape), dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf

    def to_fm(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p) in original order -> (B, p, N) contiguous, class-sorted."""
        return x.index_select(1, self.order).transpose(1, 2).contiguous()

    def from_fm(self, x: torch.Tensor) -> torch.Tensor:
        """(B, p, N) class-sorted -> (B, N, p) in original order."""
        return x.transpose(1, 2).index_select(1, self.inverse)

    def class_sums(self, g: torch.Tensor, dtype=None) -> torch.Tensor:
        """Per-class sums over the last axis: (B, q, N) -> (B, q, K), accumulated (and returned)
        in ``dtype`` if given (e.g. float64 sums of a float32 state without a float64 copy)."""
        if self.balanced:
            return g.reshape(*g.shape[:-1], self.K, self.n).sum(-1, dtype=dtype)
        return torch.stack([g[..., a:b].sum(-1, dtype=dtype)
                            for a, b in zip(self.bounds[:-1], self.bounds[1:])], -1)

    def add_per_class(self, x: torch.Tensor, v: torch.Tensor) -> None:
        """In place: x[..., j] += v[..., class of j]; x (B, p, N), v (B, p, K)."""
        if self.balanced:
            x.view(*x.shape[:-1], self.K, self.n).add_(v.unsqueeze(-1))
        else:
            x.add_(v.index_select(-1, self.sorted_labels))


def _validate_labels(labels, num_classes: Optional[int]) -> tuple:
    arr = _as_numpy(labels)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise ValueError(f"labels must be integer class indices 0..K-1, got dtype {arr.dtype} "
                         f"(e.g. {arr.ravel()[:3].tolist()}); map names to indices first")
    y = torch.as_tensor(arr)
    if y.dim() != 1:
        raise ValueError(f"labels must have shape (N,), got {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError("labels are empty: need at least one sample")
    if y.is_floating_point():
        if not torch.all(torch.isfinite(y) & (y == torch.round(y))):
            raise ValueError("labels must be integers")
    y = y.long()
    K = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if int(y.min()) < 0 or int(y.max()) >= K:
        raise ValueError(f"labels must lie in 0..K-1 = 0..{K - 1}, got range "
                         f"{int(y.min())}..{int(y.max())}")
    counts = torch.bincount(y, minlength=K)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"class(es) {empty} have no samples; every class 0..{K - 1} of the impact "
                         f"matrix needs at least one (class means and per-class drifts use them)")
    return y, K


class LESDE(torch.nn.Module):
    r"""The locally elastic SDE as a torchsde SDE (Ito).

    ``dX_j = (1/N) sum_j' E(t)[y_j, y_j'] G(X_j', y_j') dt + sigma(t) dW_j`` (additive noise), or
    with SGD sampling noise (``noise="sgd"``, learning rate ``lr``), or both.

    Parameters
    ----------
    labels : (N,) integer array, classes 0..K-1, any class sizes (each class non-empty).
    impacts : :class:`Impacts` (K x K, possibly batched (B, K, K) and time-varying).
    field : a :class:`DriftField`, a name ("identity", "label_projection", "cross_entropy") or a
        callable ``fn(x, y, t)``.
    sigma : additive noise level: float, ``(B,)`` array, callable of t, or Schedule; >= 0.
    noise : "additive", "sgd", "both" or "none".
    lr : learning rate h of the SGD noise.
    dim : feature dimension p (defaults to K for fields that need p = K).

    torchsde protocol: ``f(t, y)`` and ``g(t, y)`` act on flattened states ``(B, N p)``;
    ``noise_type`` is "diagonal" for additive noise and "general" when SGD noise is on (then
    ``g`` returns ``(B, N p, m)`` with m = N Brownian components for the SGD noise, followed by
    ``N p`` for the additive part: a dense reference for small N).
    """

    sde_type = "ito"

    def __init__(self, labels, impacts: Impacts, field="cross_entropy", sigma=0.0,
                 noise: str = "additive", lr: Optional[float] = None, dim: Optional[int] = None):
        super().__init__()
        if not isinstance(impacts, Impacts):
            raise ValueError("impacts must be an Impacts object (e.g. Impacts.intra_inter(alpha, beta, K))")
        self.impacts = impacts
        self.labels, self.K = _validate_labels(labels, impacts.K)
        self.N = self.labels.shape[0]
        self.field = make_field(field)
        self.p = int(dim) if dim is not None else (
            self.field.W.shape[1] if isinstance(self.field, CrossEntropyReadout) else self.K)
        if self.p < 1:
            raise ValueError(f"feature dimension p must be >= 1, got {self.p}")
        self.field.check(self.p, self.K)
        self.sigma = as_schedule(sigma, "sigma", nonneg=True)
        self.noise = NoiseSpec(noise, lr)
        self.param_batch = _batch_of(impacts.batch_size, self.sigma.batch_size)
        self.noise_type = "general" if self.noise.sgd else "diagonal"
        self._layouts = {}

    # ---------------------------------------------------------------------------------------
    def layout(self, dtype, device) -> _Layout:
        key = (dtype, str(device))
        if key not in self._layouts:
            self._layouts[key] = _Layout(self.labels, self.K, dtype, device)
        return self._layouts[key]

    def sigma_tensor(self, t: float, dtype, device) -> torch.Tensor:
        """sigma(t) as a tensor of shape (B or 1,)."""
        return torch.as_tensor(np.atleast_1d(self.sigma(t)), dtype=dtype, device=device)

    def class_drift(self, x_fm: torch.Tensor, t: float, lay: _Layout):
        """From the sorted feature-major state (B, p, N): E(t) (B|1, K, K) and the class
        drifts D (B, p, K) with ``D[..., c] = (1/N) sum_k E[c, k] S[..., k]``, S the per-class
        sums of G."""
        s = self.field._sums(x_fm, lay, t)
        E = self.impacts.torch_matrix(t, x_fm.dtype, x_fm.device)
        return E, torch.matmul(s, E.transpose(-1, -2)).div_(self.N)

    def drift(self, x, t: float = 0.0):
        """The drift for states x of shape ``(B, N, p)`` (or ``(N, p)``), same shape out."""
        xt = torch.as_tensor(x)
        squeeze = xt.dim() == 2
        xt = xt.unsqueeze(0) if squeeze else xt
        self._check_state(xt)
        lay = self.layout(xt.dtype, xt.device)
        _, d = self.class_drift(lay.to_fm(xt), t, lay)
        out = d.transpose(1, 2).index_select(1, self.labels.to(xt.device))
        out = out[0] if squeeze else out
        return out.numpy() if isinstance(x, np.ndarray) else out

    def dense_drift(self, x, t: float = 0.0) -> torch.Tensor:
        """Reference only, O(N^2 p): ``(1/N) M G`` with the N x N matrix ``M[j, j'] = E[y_j, y_j']``."""
        xt = torch.as_tensor(x)
        xt = xt.unsqueeze(0) if xt.dim() == 2 else xt
        E = self.impacts.torch_matrix(t, xt.dtype, xt.device)
        y = self.labels.to(xt.device)
        M = E[:, y][:, :, y]                                   # (B|1, N, N)
        G = self.field(xt, y, t, num_classes=self.K)
        return torch.matmul(M, G) / self.N

    def _check_state(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.N or x.shape[2] != self.p:
            raise ValueError(f"state must have shape (B, N, p) = (B, {self.N}, {self.p}), got {tuple(x.shape)}")
        if self.param_batch not in (None, 1) and x.shape[0] != self.param_batch:
            raise ValueError(f"state batch {x.shape[0]} does not match the parameter batch {self.param_batch}")

    # ---------------------------------------------------------------------------------------
    # torchsde protocol on flattened states (B, N p), samples in the original order
    def f(self, t, y):
        x = y.view(y.shape[0], self.N, self.p)
        return self.drift(x, float(t)).reshape(y.shape[0], -1)

    def _sgd_matrix(self, t: float, x: torch.Tensor) -> torch.Tensor:
        """``(B, N p, N)``: column j' is sqrt(h/N) (E[y_j, y_j'] G_j' - d_j) over (j, c)."""
        B = x.shape[0]
        y = self.labels.to(x.device)
        E = self.impacts.torch_matrix(t, x.dtype, x.device)
        G = self.field(x, y, t, num_classes=self.K)               # (B, N, p)
        M = E[:, y][:, :, y].expand(B, -1, -1)                    # (B, N, N)
        d = torch.matmul(M, G) / self.N                           # (B, N, p)
        cols = M.unsqueeze(-1) * G.unsqueeze(1) - d.unsqueeze(2)  # (B, j, j', p)
        cols = cols.permute(0, 1, 3, 2).reshape(B, self.N * self.p, self.N)
        return cols * math.sqrt(self.noise.lr / self.N)

    def g(self, t, y):
        B = y.shape[0]
        x = y.view(B, self.N, self.p)
        t = float(t)
        if not self.noise.sgd:
            s = self.sigma_tensor(t, y.dtype, y.device) if self.noise.additive else torch.zeros(1, dtype=y.dtype, device=y.device)
            return s[:, None].expand(B, y.shape[1])
        parts = [self._sgd_matrix(t, x)]
        if self.noise.additive:
            s = self.sigma_tensor(t, y.dtype, y.device)
            eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
            parts.append(s[:, None, None] * eye)
            parts[-1] = parts[-1].expand(B, -1, -1)
        return torch.cat(parts, dim=-1)

    @property
    def brownian_size(self) -> int:
        """Number of Brownian components m torchsde needs per run."""
        if not self.noise.sgd:
            return self.N * self.p
        return self.N + (self.N * self.p if self.noise.additive else 0)

    def describe(self) -> dict:
        return {"impacts": self.impacts.describe(), "field": self.field.describe(),
                "sigma": self.sigma.describe(), "noise": self.noise.kind, "lr": self.noise.lr,
                "N": self.N, "K": self.K, "p": self.p}
