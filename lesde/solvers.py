r"""Solvers for the locally elastic SDE and the discrete process it approximates.

* :func:`simulate` integrates a :class:`~lesde.model.LESDE` with one of two backends:

  - ``"native"``: a vectorised Euler-Maruyama loop written for this model. The state is kept
    class-sorted and feature-major, ``(B, p, N)``; one step costs a drift from per-class sums
    (O(B N p + B K^2 p)), one Gaussian draw and two in-place adds.
  - ``"torchsde"``: :func:`torchsde.sdeint` with any of its fixed-step methods ("euler",
    "milstein", "srk", ...), and any of its Brownian objects.

  Both step from ``ts[i]`` in steps of ``dt``, the last step of an interval shortened to land on
  ``ts[i+1]``, so that given the same Brownian increments the native loop and torchsde's
  ``euler`` produce the same path (tested to float64 precision).

  The native loop offers two-point increments (``increments="rademacher"``): each Brownian
  increment is replaced by ``+-sqrt(dt)`` with probability 1/2, which matches the Gaussian's
  first three moments, so the scheme keeps weak order 1 (Kloeden & Platen, *Numerical Solution
  of SDEs*, 1992, section 14.2) while drawing one random bit per coordinate instead of a
  Gaussian. Its paths are not Brownian paths: use it for distributions (phase sweeps, neural
  collapse statistics, coverage studies), not for strong (pathwise) convergence.

  ``method="exact"`` samples the linear models (identity and label-projection fields, additive
  noise) exactly from recorded time to recorded time, without steps: the class means by their
  Gaussian transition (:func:`lesde.theory.mean_transition`), the within-class deviations by
  Brownian increments projected to zero class mean. O(N p) per recorded time.

* :func:`simulate_feature_sgd` runs discrete one-sample (or minibatch) feature SGD:
  each step draws j' uniformly and moves every X_j by ``h E[y_j, y_j'] G(X_j', y_j')``; time
  advances by h per step. The SGD-noise SDE is its diffusion approximation.

Results come back as a :class:`Solution` (numpy arrays), saveable to ``.npz`` with a format
version. Overflow of exponentially growing (linear) models is detected per run: the run is
stopped (NaN from then on), its time recorded in ``Solution.overflow_time``, and a
:class:`LESDEOverflowWarning` raised. A run counts as overflowed as soon as anything recorded
about it would not be finite -- its drift, its class means, or its within-class second moments
(so ``within_cov`` and ``overflow_time`` always agree).

Before allocating, :func:`simulate` estimates the memory it needs (:func:`simulation_bytes`) and
refuses with :class:`lesde.resources.InsufficientMemoryError` what cannot fit.
"""
from __future__ import annotations

import json
import math
import os
import time as _time
import warnings
from dataclasses import dataclass, field as dc_field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .model import LESDE, _Layout
from .resources import check_device

__all__ = ["simulate", "simulate_feature_sgd", "Solution", "LESDEOverflowWarning",
           "initial_state", "simulation_bytes", "FORMAT_VERSION"]

FORMAT_VERSION = 1


class LESDEOverflowWarning(RuntimeWarning):
    """A run's state became non-finite (exponential growth); it was stopped."""


# ============================================================================================
# Solution
# ============================================================================================
@dataclass
class Solution:
    """What a simulation recorded.

    Attributes
    ----------
    ts : (T,) save times.
    labels : (N,) class labels.
    class_means : (T, B, K, p) per-class means of the features.
    within_cov : (T, B, K, p, p) within-class covariances ``(1/n_k) sum (X_j - mu_k)(X_j - mu_k)^T``.
    states : (T, B, N, p) full states (``record="full"``) or None (``record="summary"``).
    overflow_time : (B,) time at which a run overflowed (NaN: never): the step at which its
        drift first became non-finite, or the first save time at which its class means or
        within-class second moments are not finite in float64 (features beyond about
        1e154), whichever comes first. From then on its records are NaN.
    params : the configuration (JSON-serialisable dict).
    """

    ts: np.ndarray
    labels: np.ndarray
    class_means: np.ndarray
    within_cov: np.ndarray
    states: Optional[np.ndarray] = None
    overflow_time: Optional[np.ndarray] = None
    params: dict = dc_field(default_factory=dict)

    def __post_init__(self):
        if self.overflow_time is None:
            self.overflow_time = np.full(self.class_means.shape[1], np.nan)

    @property
    def num_runs(self) -> int:
        return self.class_means.shape[1]

    @property
    def K(self) -> int:
        return self.class_means.shape[2]

    @property
    def p(self) -> int:
        return self.class_means.shape[3]

    @property
    def N(self) -> int:
        return self.labels.shape[0]

    @property
    def overflowed(self) -> np.ndarray:
        """(B,) boolean: runs that were stopped by overflow."""
        return np.isfinite(self.overflow_time)

    def save(self, path) -> str:
        """Write an ``.npz`` file (with this module's FORMAT_VERSION); returns the path written.

        As with ``numpy.savez``, ``.npz`` is appended to a name without that suffix. The file is
        written atomically (a temporary file beside it, then a rename): an interrupted save
        leaves any previous file at ``path`` intact.
        """
        from .storage import atomic_write

        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        arrays = dict(ts=self.ts, labels=self.labels, class_means=self.class_means,
                      within_cov=self.within_cov, overflow_time=self.overflow_time,
                      format_version=np.array(FORMAT_VERSION),
                      params_json=np.array(json.dumps(self.params, default=_json_default)))
        if self.states is not None:
            arrays["states"] = self.states
        with atomic_write(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "Solution":
        """Read a file written by :meth:`save`.

        Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and
        the problem for anything else: not an ``.npz`` archive, a corrupt or truncated member,
        a missing array, an object array (never unpickled), a broken ``params_json``, another
        format version, or arrays whose shapes do not fit together.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no solution file at {path}")
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory, not a lesde solution file")
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable lesde solution file ({exc})") from None
        if not hasattr(data, "files"):
            raise ValueError(f"{path} is not a lesde solution file (a single array, not an .npz "
                             "archive)")

        def read(name, required=True):
            if name not in data.files:
                if required:
                    raise ValueError(f"{path} is not a complete lesde solution file (no array "
                                     f"{name!r})")
                return None
            try:
                return data[name]
            except ValueError as exc:
                if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                    raise ValueError(f"{path}: array {name!r} holds Python objects, which lesde "
                                     "does not unpickle") from None
                raise ValueError(f"{path}: array {name!r} is unreadable ({exc})") from None
            except Exception as exc:  # zlib.error, BadZipFile, EOFError, OSError ...
                raise ValueError(f"{path}: array {name!r} is corrupt or truncated "
                                 f"({type(exc).__name__}: {exc})") from None

        with data:
            if "format_version" not in data.files:
                raise ValueError(f"{path} is not a lesde solution file (no format_version)")
            raw_version = read("format_version")
            try:
                version = int(raw_version)
                if raw_version.shape != () or version != raw_version:
                    raise TypeError
            except (TypeError, ValueError):
                raise ValueError(f"{path}: format_version must be an integer, got "
                                 f"{raw_version!r}") from None
            if version != FORMAT_VERSION:
                raise ValueError(f"{path} has solution format version {version}; this lesde reads "
                                 f"version {FORMAT_VERSION}")
            arrays = {name: read(name) for name in ("ts", "labels", "class_means", "within_cov",
                                                    "overflow_time", "params_json")}
            arrays["states"] = read("states", required=False)
        try:
            params = json.loads(str(arrays.pop("params_json")))
            if not isinstance(params, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise ValueError(f"{path}: params_json is not valid JSON ({exc})") from None
        for name, value in arrays.items():
            if value is not None and not (np.issubdtype(value.dtype, np.number)
                                          or value.dtype == bool):
                raise ValueError(f"{path}: array {name!r} has dtype {value.dtype}, expected numbers")
        ts, cm = arrays["ts"], arrays["class_means"]
        if ts.ndim != 1 or cm.ndim != 4 or cm.shape[0] != ts.shape[0]:
            raise ValueError(f"{path}: ts {ts.shape} and class_means {cm.shape} do not fit "
                             "(expected (T,) and (T, B, K, p))")
        T, B, K, p = cm.shape
        N = arrays["labels"].shape[0] if arrays["labels"].ndim == 1 else -1
        expect = {"labels": (N,), "within_cov": (T, B, K, p, p), "overflow_time": (B,)}
        if arrays["states"] is not None:
            expect["states"] = (T, B, N, p)
        for name, shape in expect.items():
            if N < 0 or arrays[name].shape != shape:
                raise ValueError(f"{path}: array {name!r} has shape {arrays[name].shape}, expected "
                                 f"{shape} from class_means {cm.shape} and labels")
        return cls(params=params, **arrays)


def _json_default(obj):
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


# ============================================================================================
# helpers
# ============================================================================================
def initial_state(num_runs: int, N: int, p: int, std: float = 1.0, mean=0.0, *, seed=None,
                  generator: Optional[torch.Generator] = None, dtype=torch.float64,
                  device="cpu") -> torch.Tensor:
    """Gaussian initial features ``X_j(0) ~ N(mean, std^2 I)``, shape ``(num_runs, N, p)``."""
    gen = _generator(seed, generator, device)[0]
    x = torch.randn(num_runs, N, p, generator=gen, dtype=dtype, device=device)
    return x.mul_(std).add_(torch.as_tensor(mean, dtype=dtype, device=device))


def _generator(seed, generator, device):
    if generator is not None:
        if seed is not None:
            raise ValueError("give either seed or generator, not both")
        return generator, None
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2 ** 63))
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen, int(seed)


def _check_ts(ts, dt) -> np.ndarray:
    ts = np.asarray(_to_numpy(ts), dtype=float)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be a 1-d array of at least two times, got shape {ts.shape}")
    if not np.all(np.isfinite(ts)):
        raise ValueError("ts must be finite")
    if np.any(np.diff(ts) <= 0):
        raise ValueError("ts must be strictly increasing")
    if dt is not None and not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be positive and finite, got {dt}")
    return ts


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


def _interval_grid(a: float, b: float, dt: float) -> list:
    """Step boundaries from a to b: steps of dt, the last one shortened to land on b."""
    n = max(1, math.ceil((b - a) / dt - 1e-9))
    pts = [a + k * dt for k in range(n)] + [b]
    return pts


def simulation_bytes(B: int, N: int, p: int, K: int, T: int, record: str = "full",
                     itemsize: int = 8, sgd: bool = False) -> int:
    """Peak memory (bytes, an estimate erring high) of :func:`simulate` for B runs of N samples
    of dimension p in K classes, recorded at T times: the float64 records (class means and
    within-class covariances, states when ``record="full"``), the working state and its
    temporaries, and the class layout."""
    B, N, p, K, T = (int(v) for v in (B, N, p, K, T))
    records = 8 * T * B * (K * p + K * p * p + (N * p if record == "full" else 0))
    working = B * N * p * ((8 if sgd else 6) * itemsize + 3 * 8)
    layout = N * (48 + 9 * K + K * itemsize)
    return records + working + layout


def _check_simulation_memory(B, N, p, K, T, record, dtype, sgd, device) -> None:
    from .resources import check_memory

    itemsize = torch.empty((), dtype=dtype).element_size()
    need = simulation_bytes(B, N, p, K, T, record, itemsize, sgd)
    advice = (f"B = {B} runs, N = {N} samples, p = {p}, {T} save times; use fewer save times, "
              "fewer runs or samples")
    if record == "full":
        advice += ", or record='summary' (no full states)"
    check_memory(need, "this simulation", advice, device=device)


def _runs_of(sde: LESDE, x0, num_runs) -> int:
    """B for the memory estimate, before x0 is converted (shape checks come later)."""
    shape = tuple(getattr(x0, "shape", np.shape(x0)))
    if len(shape) == 3:
        return int(shape[0])
    return int(num_runs or sde.param_batch or 1)


def _dtype_of(x0, dtype):
    if dtype is not None:
        return dtype
    if isinstance(x0, torch.Tensor) and x0.is_floating_point():
        return x0.dtype
    return torch.float32 if getattr(x0, "dtype", None) == np.float32 else torch.float64


def _prepare_x0(sde: LESDE, x0, num_runs, dtype, device) -> torch.Tensor:
    if num_runs is not None and (isinstance(num_runs, bool) or int(num_runs) != num_runs
                                 or num_runs < 1):
        raise ValueError(f"num_runs must be a positive integer, got {num_runs!r}")
    x = torch.as_tensor(_to_numpy(x0) if not isinstance(x0, torch.Tensor) else x0)
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.float64
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    x = x.to(dtype=dtype, device=device)
    if x.dim() == 2:
        B = num_runs or (sde.param_batch if sde.param_batch not in (None,) else 1)
        x = x.unsqueeze(0).expand(B, -1, -1)
    elif x.dim() != 3:
        raise ValueError(f"x0 must have shape (N, p) or (B, N, p), got {tuple(x.shape)}")
    elif num_runs is not None and x.shape[0] != num_runs:
        raise ValueError(f"x0 has {x.shape[0]} runs but num_runs={num_runs}")
    if x.shape[0] < 1:
        raise ValueError("x0 has no runs (B = 0)")
    sde._check_state(x)
    if not torch.isfinite(x).all():
        raise ValueError("x0 contains non-finite values")
    return x.contiguous().clone()


class _Recorder:
    """Collects class means, within-class covariances and (optionally) full states."""

    def __init__(self, T, B, lay: _Layout, p, full: bool):
        self.lay, self.full = lay, full
        K = lay.K
        self.means = np.full((T, B, K, p), np.nan)
        self.cov = np.full((T, B, K, p, p), np.nan)
        self.states = np.full((T, B, lay.N, p), np.nan) if full else None
        self.counts = torch.tensor(lay.counts, dtype=lay.dtype, device=lay.device)

    def record(self, i: int, x_fm: torch.Tensor, stopped: np.ndarray) -> np.ndarray:
        """Record state i; returns a (B,) mask of runs whose state is not finite."""
        lay = self.lay
        means = lay.class_sums(x_fm) / self.counts                      # (B, p, K)
        cent = x_fm.clone()
        lay.add_per_class(cent, -means)
        cent = cent.double()  # second moments in float64, also for float32 states
        if lay.balanced:
            c = cent.view(*cent.shape[:2], lay.K, lay.n)
            cov = torch.einsum("bpkn,bqkn->bkpq", c, c) / lay.n
        else:
            cov = torch.stack([torch.matmul(cent[..., a:b], cent[..., a:b].transpose(1, 2)) / (b - a)
                               for a, b in zip(lay.bounds[:-1], lay.bounds[1:])], 1)
        m = means.transpose(1, 2).cpu().numpy()
        c = cov.cpu().numpy()
        # a state whose class means or within-class second moments are not finite (in float64)
        # has overflowed, even when every feature is still finite
        bad = ~(np.isfinite(m).reshape(m.shape[0], -1).all(1)
                & np.isfinite(c).reshape(c.shape[0], -1).all(1))
        keep = ~(bad | stopped)
        self.means[i, keep] = m[keep]
        self.cov[i, keep] = c[keep]
        if self.full:
            self.states[i, keep] = lay.from_fm(x_fm).cpu().numpy()[keep]
        return bad


# ============================================================================================
# schemes: option checks, two-point increments
# ============================================================================================
_INCREMENTS = ("gaussian", "rademacher")


def _check_scheme(sde: LESDE, backend: str, method: str, increments: str, brownian, dt) -> None:
    """Validate the method / increments / backend combination once, before any work."""
    if increments not in _INCREMENTS:
        raise ValueError(f"increments must be 'gaussian' or 'rademacher', got {increments!r}")
    if backend == "native" and method not in ("euler", "exact"):
        raise ValueError(f"the native backend's method is 'euler' or 'exact', got {method!r} "
                         f"(other methods need backend='torchsde')")
    if backend == "torchsde" and method == "exact":
        raise ValueError("method='exact' is a native sampler: use backend='native'")
    if increments == "rademacher":
        if backend != "native" or method != "euler":
            raise ValueError("two-point (rademacher) increments are not Brownian increments: they work "
                             "with the native Euler scheme only (backend='native', method='euler'), not "
                             "with torchsde's solvers or the exact sampler")
        if brownian is not None:
            raise ValueError("two-point (rademacher) increments cannot use a Brownian object: give a "
                             "seed or generator, or use increments='gaussian' with brownian=")
    if method == "exact":
        from .model import Identity, LabelProjection

        if not isinstance(sde.field, (Identity, LabelProjection)):
            raise ValueError(f"method='exact' samples the linear models only (identity or "
                             f"label_projection field), not the {sde.field.name!r} field; use "
                             f"method='euler'")
        if sde.noise.sgd:
            raise ValueError(f"method='exact' needs additive noise (or none); SGD sampling noise "
                             f"(noise={sde.noise.kind!r}) makes the class means' diffusion depend on "
                             f"the state: use method='euler'")
        if brownian is not None:
            raise ValueError("method='exact' draws its own Gaussians; it cannot use a Brownian object")
    elif dt is None:
        raise ValueError("dt (the step size) is required, except for method='exact'")


_SIGN_TABLES = {}


def _sign_table(dtype, device) -> torch.Tensor:
    """(256, 8): row v holds the 8 bits of the byte v as signs, bit k -> +1 if set, else -1."""
    key = (dtype, str(device))
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (2 * bits - 1).to(dtype=dtype, device=device)
    return _SIGN_TABLES[key]


class _TwoPoint:
    """Independent signs +-1 (probability 1/2 each) of a fixed shape, drawn in bulk.

    One call of the generator fills 64-bit words (every bit uniform and independent); each
    byte of a word is expanded into 8 signs by a 256 x 8 lookup table. Per sign that is 1/64
    of a random draw and one table copy, instead of a Gaussian; measured the fastest of
    torch.randint, shifts and masks on int64 or uint8, sign-bit injection, and the table
    (benchmarks/README.md).
    """

    def __init__(self, shape, dtype, device, gen):
        self.shape = tuple(shape)
        numel = int(np.prod(self.shape))
        words = max(1, -(-numel // 64))
        self.gen = gen
        self.table = _sign_table(dtype, device)
        self.words = torch.empty(words, dtype=torch.int64, device=device)
        self.index = torch.empty(8 * words, dtype=torch.int32, device=device)
        self.out = torch.empty(64 * words, dtype=dtype, device=device)
        self.view = self.out[:numel].view(self.shape)

    def draw(self) -> torch.Tensor:
        """Fresh signs (a view of an internal buffer, overwritten by the next draw)."""
        self.words.random_(-2 ** 63, None, generator=self.gen)   # the full 64-bit range
        self.index.copy_(self.words.view(torch.uint8))
        torch.index_select(self.table, 0, self.index, out=self.out.view(-1, 8))
        return self.view


def _warn_overflow(overflow_time: np.ndarray, where: str) -> None:
    idx = np.flatnonzero(np.isfinite(overflow_time))
    if idx.size:
        warnings.warn(
            f"{idx.size} run(s) overflowed (non-finite state) and were stopped; first at "
            f"t={np.nanmin(overflow_time):.6g} (runs {idx[:10].tolist()}{'...' if idx.size > 10 else ''}). "
            f"See Solution.overflow_time; {where}", LESDEOverflowWarning, stacklevel=3)


def _progress(total, enabled, desc):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=0.5)


# ============================================================================================
# simulate
# ============================================================================================
def simulate(sde: LESDE, x0, ts, dt: Optional[float] = None, *, backend: str = "native",
             method: str = "euler", seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None, brownian: Optional[Callable] = None,
             num_runs: Optional[int] = None, record: str = "full", dtype=None, device=None,
             progress: bool = False, draw_dtype=torch.float32,
             increments: str = "gaussian") -> Solution:
    r"""Integrate the locally elastic SDE from ``x0`` over the save times ``ts``.

    Parameters
    ----------
    sde : :class:`~lesde.model.LESDE`.
    x0 : ``(N, p)`` (replicated over runs) or ``(B, N, p)`` initial features, numpy or torch.
    ts : ``(T,)`` strictly increasing save times; the state at ``ts[0]`` is ``x0``.
    dt : step size (> 0); each interval ``[ts[i], ts[i+1]]`` is covered by steps of dt, the
        last one shortened to land on ``ts[i+1]``. Not used (may be None) by ``method="exact"``.
    backend : "native" (Euler-Maruyama written for this model) or "torchsde".
    method : native backend: "euler" (Euler-Maruyama) or "exact" (exact sampling of the linear
        models with additive noise, identity or label-projection field: no steps, O(N p) per
        save time; nonlinear fields and SGD noise are refused). torchsde backend: its method
        ("euler", "milstein", "srk", ...).
    seed, generator : randomness (one of them). Same seed, same result. For the torchsde
        backend the seed is the ``entropy`` of its BrownianInterval.
    brownian : optional Brownian object (e.g. ``torchsde.BrownianInterval``) called as
        ``brownian(t0, t1) -> (B, m)`` increments, m = ``sde.brownian_size``, samples in the
        original order; both backends then use exactly these increments.
    num_runs : number of independent runs B when ``x0`` is ``(N, p)`` and parameters are not batched.
    record : "full" (states, class means, within-class covariances) or "summary" (no states).
    dtype, device : float32 / float64, "cpu" / "cuda" (default: those of x0).
    progress : show a progress bar.
    draw_dtype : dtype in which the native backend draws its Gaussian increments before adding
        them to the state (float32 by default: 3-4x cheaper in float64 runs; the increments are
        exact Gaussians rounded to float32). Pass ``torch.float64`` for float64 draws. The exact
        sampler draws its within-class Gaussians in it too.
    increments : "gaussian" (Euler-Maruyama) or "rademacher" (native Euler only): every
        Brownian increment of the step, additive and SGD noise alike, is ``+-sqrt(h)`` with
        probability 1/2, drawn 64 signs per random 64-bit word. Same mean, covariance and third
        moments per step as Gaussian increments, hence weak order 1 (for the linear models the
        means and covariances of the Euler iterates are exactly those of the Gaussian scheme);
        the paths are not Brownian paths (no strong convergence), so it does not combine with
        ``brownian=`` or the torchsde backend. The signs are exact in any dtype
        (``draw_dtype`` is not used).

    Returns
    -------
    :class:`Solution`.
    """
    if not isinstance(sde, LESDE):
        raise ValueError("sde must be a lesde.LESDE")
    if record not in ("full", "summary"):
        raise ValueError(f"record must be 'full' or 'summary', got {record!r}")
    if backend not in ("native", "torchsde"):
        raise ValueError(f"backend must be 'native' or 'torchsde', got {backend!r}")
    _check_scheme(sde, backend, method, increments, brownian, dt)
    ts = _check_ts(ts, dt)
    if device is None:
        device = x0.device if isinstance(x0, torch.Tensor) else "cpu"
    device = check_device(device)
    _check_simulation_memory(_runs_of(sde, x0, num_runs), sde.N, sde.p, sde.K, ts.shape[0],
                             record, _dtype_of(x0, dtype), sde.noise.sgd, device)
    x = _prepare_x0(sde, x0, num_runs, dtype, device)
    t_start = _time.perf_counter()
    if backend == "native" and method == "exact":
        gen, used_seed = _generator(seed, generator, device)
        sol = _simulate_exact(sde, x, ts, gen, record, progress, draw_dtype)
    elif backend == "native":
        gen, used_seed = (None, None) if brownian is not None else _generator(seed, generator, device)
        sol = _simulate_native(sde, x, ts, float(dt), gen, brownian, record, progress, draw_dtype,
                               increments)
    else:
        sol, used_seed = _simulate_torchsde(sde, x, ts, float(dt), method, seed, brownian, record, progress)
    sol.params.update(sde.describe())
    sol.params.update(dict(backend=backend, method=method, increments=increments,
                           dt=None if dt is None else float(dt), seed=used_seed,
                           dtype=str(x.dtype).replace("torch.", ""),
                           device=str(device), num_runs=int(x.shape[0]),
                           wall_seconds=_time.perf_counter() - t_start, process="sde",
                           format_version=FORMAT_VERSION))
    _warn_overflow(sol.overflow_time, "stopped runs are NaN from then on")
    return sol


def _simulate_native(sde: LESDE, x0, ts, dt, gen, brownian, record, progress, draw_dtype,
                     increments="gaussian") -> Solution:
    dtype, device = x0.dtype, x0.device
    lay = sde.layout(dtype, device)
    X = lay.to_fm(x0)
    B, p, N = X.shape
    T = ts.shape[0]
    rec = _Recorder(T, B, lay, p, record == "full")
    stopped = np.zeros(B, dtype=bool)
    overflow_time = np.full(B, np.nan)
    bad = rec.record(0, X, stopped)  # x0 is finite (validated)
    noise = sde.noise
    sigma_const = sde.sigma.constant
    sigma = sde.sigma_tensor(ts[0], dtype, device).view(-1, 1, 1)
    first_bad = torch.full((B,), float("nan"), dtype=torch.float64, device=device)
    sqrt_lr_over_n = math.sqrt(noise.lr / N) if noise.sgd else 0.0
    grids = [_interval_grid(ts[i], ts[i + 1], dt) for i in range(T - 1)]
    eps_buf = torch.empty(B, p, N, dtype=draw_dtype, device=device)
    two_point = increments == "rademacher"
    if two_point:
        signs = _TwoPoint((B, p, N), dtype, device, gen) if noise.additive else None
        zeta_signs = _TwoPoint((B, N), dtype, device, gen) if noise.sgd else None
    nan_t = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    pbar = _progress(sum(len(g) - 1 for g in grids), progress, "lesde simulate")
    for i, grid in enumerate(grids):
        for t, t_next in zip(grid[:-1], grid[1:]):
            h = t_next - t
            E, d = sde.class_drift(X, t, lay)
            # overflow bookkeeping on the device, no synchronisation: the first time a run's
            # drift is non-finite is kept (fmin ignores NaN).
            first_bad = torch.fmin(first_bad, torch.where(torch.isfinite(d).flatten(1).all(1), nan_t, t))
            if brownian is not None:
                dW = brownian(t, t_next).to(dtype)
            inc = d * h
            if noise.sgd:
                if brownian is not None:
                    zeta = dW[:, :N].index_select(1, lay.order)      # (B, N), variance h
                elif two_point:
                    zeta = zeta_signs.draw() * math.sqrt(h)           # +-sqrt(h)
                else:
                    zeta = torch.randn(B, N, generator=gen, dtype=draw_dtype, device=device).to(dtype)
                    zeta.mul_(math.sqrt(h))
                g = sde.field._fm(X, lay.onehot, t)
                tk = lay.class_sums(g * zeta.unsqueeze(1))            # (B, p, K)
                z = zeta.sum(1).view(B, 1, 1)
                inc = inc + (torch.matmul(tk, E.transpose(-1, -2)) - d * z).mul_(sqrt_lr_over_n)
            lay.add_per_class(X, inc)
            if noise.additive:
                if not sigma_const:
                    sigma = sde.sigma_tensor(t, dtype, device).view(-1, 1, 1)
                if brownian is not None:
                    add = dW[:, -N * p:].view(B, N, p)
                    X.add_(lay.to_fm(add) * sigma)
                elif two_point:
                    eps = signs.draw()                                # +-1, state dtype
                    if sigma.shape[0] == 1:
                        X.add_(eps, alpha=float(sigma) * math.sqrt(h))
                    else:
                        X.addcmul_(eps, sigma * math.sqrt(h))
                else:
                    eps = torch.randn(B, p, N, generator=gen, dtype=draw_dtype, device=device, out=eps_buf)
                    if sigma.shape[0] == 1:
                        X.add_(eps, alpha=float(sigma) * math.sqrt(h))
                    else:
                        X.add_(eps.mul_(sigma.to(draw_dtype) * math.sqrt(h)))
            if pbar is not None:
                pbar.update(1)
        bad = rec.record(i + 1, X, stopped)
        fb = first_bad.cpu().numpy()
        newly = (bad | np.isfinite(fb)) & ~stopped
        overflow_time[newly] = np.where(np.isfinite(fb[newly]), fb[newly], ts[i + 1])
        stopped |= newly
        if stopped.all():
            break
    if pbar is not None:
        pbar.close()
    return Solution(ts=ts, labels=sde.labels.numpy().copy(), class_means=rec.means,
                    within_cov=rec.cov, states=rec.states, overflow_time=overflow_time, params={})


def _simulate_exact(sde: LESDE, x0, ts, gen, record, progress, draw_dtype) -> Solution:
    """Exact sampling of the linear models with additive noise, save time to save time.

    Class means (float64, kept apart from the state): ``m <- Phi m + L z``, ``z ~ N(0, I)``
    (:func:`lesde.theory.mean_transition`). Within-class deviations: ``+ s (Z_j - Zbar_k)`` with
    ``s^2 = int sigma^2`` over the interval and Z standard Gaussians, which is the projection of
    the samples' Brownian increments to zero class mean and independent of the class means'
    noise. The state is then shifted per class so that its class means are the new m.
    """
    from .theory import mean_transition

    dtype, device = x0.dtype, x0.device
    lay = sde.layout(dtype, device)
    X = lay.to_fm(x0)
    B, p, N = X.shape
    K = lay.K
    T = ts.shape[0]
    rec = _Recorder(T, B, lay, p, record == "full")
    stopped = np.zeros(B, dtype=bool)
    overflow_time = np.full(B, np.nan)
    rec.record(0, X, stopped)
    counts = torch.tensor(lay.counts, dtype=torch.float64, device=device)
    labels = sde.labels.numpy()
    sigma = sde.sigma if sde.noise.additive else 0.0
    noisy = sde.noise.additive and not (sde.sigma.constant and not np.any(np.atleast_1d(sde.sigma(0.0))))
    m = lay.class_sums(X, dtype=torch.float64) / counts                 # (B, p, K), float64
    constant = sde.impacts.constant and (not sde.noise.additive or sde.sigma.constant)
    cache = {}                                                          # interval length -> transition
    pbar = _progress(T - 1, progress, "lesde simulate (exact)")
    for i in range(T - 1):
        t0, t1 = float(ts[i]), float(ts[i + 1])
        # intervals of equal length share a transition; lengths equal to 12 digits count as
        # equal (save grids from linspace differ in the last bits), an error of 1e-12 in time
        key = float(f"{t1 - t0:.12g}")
        tr = cache.get(key) if constant else None
        if tr is None:
            tr = mean_transition(sde.impacts, labels, sde.field, p, t0, t1, sigma)
            tr = tuple(torch.as_tensor(a, dtype=torch.float64, device=device)
                       for a in (tr.phi, tr.chol, tr.within_var)) + (tr.per_coordinate,)
            if constant:
                cache[key] = tr
        phi, chol, within, per_coordinate = tr
        if per_coordinate:                                              # (B|1, K, K) on each coordinate
            z = torch.randn(B, p, K, generator=gen, dtype=torch.float64, device=device)
            m_new = torch.matmul(m, phi.transpose(1, 2)) + torch.matmul(z, chol.transpose(1, 2))
        else:                                                           # (B|1, K p, K p) on vec(Xbar)
            z = torch.randn(B, K * p, 1, generator=gen, dtype=torch.float64, device=device)
            v = m.transpose(1, 2).reshape(B, K * p, 1)
            m_new = (torch.matmul(phi, v) + torch.matmul(chol, z)).view(B, K, p).transpose(1, 2)
        current = lay.class_sums(X, dtype=torch.float64) / counts
        if noisy:
            s = within.sqrt().view(-1, 1, 1)
            Z = torch.randn(B, p, N, generator=gen, dtype=draw_dtype, device=device)
            current = current + s * (lay.class_sums(Z, dtype=torch.float64) / counts)
            X.addcmul_(Z if Z.dtype == dtype else Z.to(dtype), s.to(dtype))
        lay.add_per_class(X, (m_new - current).to(dtype))
        m = m_new
        bad = rec.record(i + 1, X, stopped)
        newly = bad & ~stopped
        overflow_time[newly] = ts[i + 1]
        stopped |= newly
        if pbar is not None:
            pbar.update(1)
        if stopped.all():
            break
    if pbar is not None:
        pbar.close()
    return Solution(ts=ts, labels=sde.labels.numpy().copy(), class_means=rec.means,
                    within_cov=rec.cov, states=rec.states, overflow_time=overflow_time, params={})


def _simulate_torchsde(sde: LESDE, x0, ts, dt, method, seed, brownian, record, progress):
    import torchsde

    dtype, device = x0.dtype, x0.device
    B, N, p = x0.shape
    lay = sde.layout(dtype, device)
    used_seed = None
    if brownian is None:
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 63))
        used_seed = int(seed)
        levy = {"srk": "space-time", "log_ode": "foster"}.get(method, "none")
        brownian = torchsde.BrownianInterval(t0=float(ts[0]), t1=float(ts[-1]),
                                             size=(B, sde.brownian_size), dtype=dtype, device=device,
                                             entropy=used_seed, dt=dt, levy_area_approximation=levy)
    T = ts.shape[0]
    rec = _Recorder(T, B, lay, p, record == "full")
    stopped = np.zeros(B, dtype=bool)
    overflow_time = np.full(B, np.nan)
    y = x0.reshape(B, N * p)
    rec.record(0, lay.to_fm(x0), stopped)
    pbar = _progress(T - 1, progress, "lesde simulate (torchsde)")
    with torch.no_grad():
        for i in range(T - 1):
            tt = torch.tensor([ts[i], ts[i + 1]], dtype=dtype, device=device)
            y = torchsde.sdeint(sde, y, tt, bm=brownian, method=method, dt=dt)[-1]
            bad = rec.record(i + 1, lay.to_fm(y.view(B, N, p)), stopped)
            newly = bad & ~stopped
            overflow_time[newly] = ts[i + 1]
            stopped |= newly
            if pbar is not None:
                pbar.update(1)
            if stopped.all():
                break
    if pbar is not None:
        pbar.close()
    sol = Solution(ts=ts, labels=sde.labels.numpy().copy(), class_means=rec.means,
                   within_cov=rec.cov, states=rec.states, overflow_time=overflow_time, params={})
    return sol, used_seed


# ============================================================================================
# discrete feature SGD
# ============================================================================================
def simulate_feature_sgd(sde: LESDE, x0, ts, *, lr: Optional[float] = None, batch_size: int = 1,
                         seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                         num_runs: Optional[int] = None, record: str = "full", dtype=None,
                         device=None, progress: bool = False) -> Solution:
    r"""Discrete one-sample (or minibatch) feature SGD, the process the SGD-noise SDE approximates.

    Each step draws a minibatch J of ``batch_size`` samples uniformly without replacement (per
    run) and moves every feature::

        X_j <- X_j + (h / b) sum_{j' in J} E(t)[y_j, y_j'] G(X_j', y_j'; t),      t <- t + h

    so that the mean move per step is ``h`` times the SDE drift. If ``sde`` has additive noise,
    ``sigma(t) sqrt(h) xi_j`` (independent standard Gaussians) is added per step as well.

    ``ts`` must lie on the step grid ``ts[0] + k h``. ``lr`` (h) defaults to ``sde``'s lr.
    Returns a :class:`Solution` like :func:`simulate` (``params["process"] = "feature_sgd"``).
    """
    if record not in ("full", "summary"):
        raise ValueError(f"record must be 'full' or 'summary', got {record!r}")
    h = lr if lr is not None else sde.noise.lr
    if h is None or not (np.isfinite(h) and h > 0):
        raise ValueError(f"feature SGD needs a positive finite learning rate lr, got {h}")
    ts = _check_ts(ts, None)
    steps = np.round((ts - ts[0]) / h).astype(np.int64)
    if np.any(np.abs(steps * h - (ts - ts[0])) > 1e-6 * np.maximum(1.0, np.abs(ts))):
        raise ValueError(f"ts must lie on the step grid ts[0] + k*lr (lr={h})")
    if int(batch_size) != batch_size or not 1 <= batch_size <= sde.N:
        raise ValueError(f"batch_size must be an integer in 1..N={sde.N}, got {batch_size}")
    if device is None:
        device = x0.device if isinstance(x0, torch.Tensor) else "cpu"
    device = check_device(device)
    _check_simulation_memory(_runs_of(sde, x0, num_runs), sde.N, sde.p, sde.K, ts.shape[0],
                             record, _dtype_of(x0, dtype), False, device)
    x = _prepare_x0(sde, x0, num_runs, dtype, device)
    gen, used_seed = _generator(seed, generator, device)
    dtype = x.dtype
    lay = sde.layout(dtype, device)
    X = lay.to_fm(x)
    B, p, N = X.shape
    T = ts.shape[0]
    rec = _Recorder(T, B, lay, p, record == "full")
    stopped = np.zeros(B, dtype=bool)
    overflow_time = np.full(B, np.nan)
    rec.record(0, X, stopped)
    onehot = lay.onehot[0]                                           # (K, N)
    b = int(batch_size)
    t_start = _time.perf_counter()
    pbar = _progress(int(steps[-1]), progress, "lesde feature-sgd")
    k = 0
    for i in range(1, T):
        while k < steps[i]:
            t = ts[0] + k * h
            if b == 1:
                idx = torch.randint(N, (B, 1), generator=gen, device=device)
            else:
                idx = torch.rand(B, N, generator=gen, device=device).argsort(1)[:, :b]
            x_sel = X.gather(2, idx.unsqueeze(1).expand(B, p, b))    # (B, p, b)
            oh = onehot[:, idx].permute(1, 0, 2)                      # (B, K, b)
            g = sde.field._fm(x_sel, oh, t)
            s = torch.matmul(g, oh.transpose(1, 2))                   # (B, p, K)
            E = sde.impacts.torch_matrix(t, dtype, device)
            lay.add_per_class(X, torch.matmul(s, E.transpose(-1, -2)).mul_(h / b))
            if sde.noise.additive:
                sig = sde.sigma_tensor(t, dtype, device).view(-1, 1, 1)
                X.add_(torch.randn(B, p, N, generator=gen, dtype=dtype, device=device) * (sig * math.sqrt(h)))
            k += 1
            if pbar is not None:
                pbar.update(1)
        bad = rec.record(i, X, stopped)
        newly = bad & ~stopped
        overflow_time[newly] = ts[i]
        stopped |= newly
        if stopped.all():
            break
    if pbar is not None:
        pbar.close()
    params = sde.describe()
    params.update(dict(process="feature_sgd", lr=float(h), batch_size=b, seed=used_seed,
                       dtype=str(dtype).replace("torch.", ""), device=str(device), num_runs=B,
                       wall_seconds=_time.perf_counter() - t_start, format_version=FORMAT_VERSION))
    sol = Solution(ts=ts, labels=sde.labels.numpy().copy(), class_means=rec.means, within_cov=rec.cov,
                   states=rec.states, overflow_time=overflow_time, params=params)
    _warn_overflow(sol.overflow_time, "stopped runs are NaN from then on")
    return sol
