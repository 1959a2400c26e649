r"""Phase sweeps: P(separable at T) over a grid of model parameters, resumable and distributable.

The separability phase transition of the locally elastic SDE (Zhang, Wang & Su, NeurIPS 2021,
arXiv 2110.05960): with constant impacts the features separate iff ``alpha > beta`` (the centred
class means grow like ``exp((A - B)/K)``, ``A = int alpha``, ``B = int beta``); with decaying
impacts ``alpha(t) = alpha0 (1 + t/t0)^(-r)`` the integral ``A(t)`` diverges iff ``r <= 1``.
A sweep measures this on simulations::

    spec = PhaseSpec(grid={"alpha": np.linspace(0.1, 1, 10), "beta": np.linspace(0.1, 1, 10)},
                     drift="cross_entropy", noise="sgd", lr=1.0, times=(100, 400), replicates=8)
    table = run_sweep(spec, "sweep_dir")            # resumable; client=... runs it on Dask

**The grid.** ``grid`` maps parameter names to value lists; the sweep covers their Cartesian
product (first name slowest). Names:

* batched inside one simulation (one entry of the batch dimension B per run): ``alpha``,
  ``beta`` (the initial values alpha0, beta0 of the impacts), ``gap`` (sets
  ``alpha = beta + gap``), ``r_alpha``, ``r_beta`` (decay exponents of
  ``alpha(t) = alpha0 (1 + t/t0)^(-r_alpha)`` and ``beta(t) = beta0 (1 + t/t0)^(-r_beta)``; 0 is
  constant), ``r`` (both exponents at once), ``sigma`` (additive noise), ``init_std``;
* structural (runs with different values go to different simulations): ``K``, ``n`` (samples
  per class), ``noise`` ("additive", "sgd", "both"), ``lr`` (learning rate h of the SGD noise),
  ``t0``, ``drift``.

Parameters not in the grid take the spec's value. Each grid point is simulated ``replicates``
times; (point, replicate) pairs are folded into the batch dimension and cut into chunks of at
most ``chunk_size`` runs, which bounds memory (``saves x chunk_size x N x p`` float64 states).

**What is measured** at each time ``T`` of ``spec.times`` (per run, then per point):

* ``sep_readout`` -- **the order parameter** for fields whose features are logits
  (cross-entropy drift, p = K): the model's own read-out (argmax of the logits) classifies
  every training sample correctly (training accuracy 1; the background's "separable, meaning
  vanishing training loss", whose loss then falls towards 0). ``sep_loss``: training
  cross-entropy below ``loss_threshold`` (a stricter reading of the same notion).
* ``sep_ncc`` -- the nearest-class-centre classifier classifies every sample correctly. This is
  the order parameter for fields without a read-out (identity "I-model", label projection).
* ``sep_lp`` -- linearly separable by *any* affine classifier (the exact LP of
  :func:`lesde.metrics.linear_separability`): a different, weaker notion. With the cross-entropy
  drift and ``beta > alpha`` class k drifts along ``-d_k``: the features become separable by a
  *reversed* classifier while the training loss diverges and the accuracy is 0. The LP is skipped
  (answer True) when the read-out or the NCC classifier already separates, both being affine.
* ``loss`` (training cross-entropy of the logits, NaN without a read-out), ``accuracy``,
  ``ncc_accuracy``, ``nc1`` (Papyan, Han & Donoho, PNAS 2020) and ``t_sep``, the first save time
  at which the order parameter holds (NaN if not before T; resolution: the save grid).

``sep`` is the order parameter of the run's model (``sep_readout`` for logit features,
``sep_ncc`` otherwise); the table's ``notion`` column names it. The per-point table has
``p_<x>`` = fraction of replicates and ``p_<x>_se = sqrt(p (1 - p)/R)`` (the binomial standard
error; 0 when all replicates agree), and ``<m>_mean``, ``<m>_se`` (standard error of the mean,
ddof = 1) for the continuous measures; ``t_sep`` is averaged over the replicates that separated.
Runs whose state overflowed are counted in ``p_overflow`` and left out of the other averages.

**Reproducibility.** The seeds of chunk i are drawn from ``numpy.random.SeedSequence(seed,
spawn_key=(i,))``, so a chunk's result depends only on the spec and i: a rerun, a resumed run and
a Dask run give the same table (bitwise, for the same torch thread count; Dask tasks use one
thread). An existing sweep directory with a different configuration is an error.

**Co-moving frame** (``comoving=True``, identity drift with additive noise only). For the
I-model the all-ones mode of E grows like ``exp((A + (K-1) B)/K)`` and swamps float64 (and
overflows) long before ``A - B`` is large near the diagonal. For balanced classes, replacing E by
``E' = (alpha - beta)(I - 11^T/K)`` changes every feature by the same vector at each time
(exactly, path by path, for the same Brownian increments), so all translation-invariant
measures (NCC accuracy, LP separability, NC1) are unchanged; ``E'`` has eigenvalue 0 on the
all-ones direction, so nothing overflows.

**Scheme** (``method``, ``increments``). ``method="euler"`` steps with ``dt``; with
``increments="rademacher"`` its Brownian increments are two-point (``+-sqrt(dt)``), weak order 1
like the Gaussian scheme and several times cheaper to draw (phase probabilities are
distributional, so they need no Brownian paths). ``method="exact"`` (identity or
label-projection drift with additive noise) samples the states at the save times exactly, with
no steps and no ``dt`` bias: its cost is one Gaussian per coordinate per *save time*, so
``saves`` sets it (see :func:`lesde.solvers.simulate`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["PhaseSpec", "run_sweep", "load_sweep", "summarize_runs", "collapse_over_time",
           "chunk_bytes", "PHASE_FORMAT_VERSION"]

PHASE_FORMAT_VERSION = 1

_BATCHED = ("alpha", "beta", "gap", "r", "r_alpha", "r_beta", "sigma", "init_std")
_STRUCTURAL = ("K", "n", "noise", "lr", "t0", "drift")
_GRID_KEYS = _BATCHED + _STRUCTURAL
_LOGIT_FIELDS = ("cross_entropy", "ce")
_MEASURES = ("loss", "accuracy", "ncc_accuracy", "nc1")
_FLAGS = ("sep", "sep_readout", "sep_loss", "sep_ncc", "sep_lp")


@dataclass(frozen=True)
class PhaseSpec:
    r"""Immutable configuration of a phase sweep (see the module docstring for the grid names).

    Parameters
    ----------
    grid : mapping name -> sequence of values (Cartesian product, first name slowest); stored as
        a tuple of ``(name, tuple(values))`` pairs.
    drift : "cross_entropy" (logit features, p = K), "identity" (I-model) or "label_projection".
    noise : "additive", "sgd" or "both"; ``lr`` the learning rate h of the SGD noise.
    K, n, p : classes, samples per class (N = K n), feature dimension (default K).
    alpha, beta : initial intra-/inter-class impacts alpha0, beta0 (when not in the grid).
    r_alpha, r_beta, t0 : decay ``a(t) = a0 (1 + t/t0)^(-r)`` (r = 0: constant).
    sigma : additive noise level. ``init_std`` : X(0) ~ N(0, init_std^2 I).
    times : the times T at which separability is scored (one table row per point and T).
    dt : Euler-Maruyama step. ``saves`` : number of save times on [0, max(times)] (the
        resolution of the time to first separation; the ``times`` are always saved too).
    replicates : R runs per grid point. ``seed`` : sweep seed. ``chunk_size`` : runs per chunk.
    loss_threshold : the loss below which ``sep_loss`` holds (nats).
    lp : run the LP separability test (else ``sep_lp`` is NaN).
    comoving : simulate the I-model in the co-moving frame (module docstring).
    dtype : "float64" or "float32".
    method : "euler" (steps of dt) or "exact" (linear drifts with additive noise; no steps).
    increments : "gaussian" or "rademacher" (two-point increments, Euler only).
        Both are left out of :meth:`to_dict` at their defaults, so sweeps written before these
        options existed keep their configuration and digest (and resume).
    """

    grid: Tuple[Tuple[str, Tuple], ...]
    drift: str = "cross_entropy"
    noise: str = "sgd"
    lr: float = 1.0
    K: int = 3
    n: int = 50
    p: Optional[int] = None
    alpha: float = 1.0
    beta: float = 0.0
    r_alpha: float = 0.0
    r_beta: float = 0.0
    t0: float = 1.0
    sigma: float = 0.0
    init_std: float = 0.5
    times: Tuple[float, ...] = (400.0,)
    dt: float = 0.5
    saves: int = 41
    replicates: int = 8
    seed: int = 0
    chunk_size: int = 256
    loss_threshold: float = 0.1
    lp: bool = True
    comoving: bool = False
    dtype: str = "float64"
    method: str = "euler"
    increments: str = "gaussian"

    def __post_init__(self):
        grid = self.grid
        if isinstance(grid, Mapping):
            grid = list(grid.items())
        norm = []
        for item in grid:
            if len(item) != 2:
                raise ValueError(f"grid entries must be (name, values) pairs, got {item!r}")
            name, values = item
            if name not in _GRID_KEYS:
                raise ValueError(f"unknown grid parameter {name!r}; known: {', '.join(_GRID_KEYS)}")
            vals = np.atleast_1d(np.asarray(values, dtype=object)).tolist()
            if not vals:
                raise ValueError(f"grid parameter {name!r} has no values")
            if name in ("noise", "drift"):
                vals = [str(v) for v in vals]
            elif name in ("K", "n"):
                if any(isinstance(v, (str, bool)) or not isinstance(v, (int, float, np.number))
                       or not math.isfinite(v) or int(v) != v or int(v) < 1 for v in vals):
                    raise ValueError(f"grid parameter {name!r} must hold positive integers, got {vals}")
                vals = [int(v) for v in vals]
            else:
                try:
                    vals = [float(v) for v in vals]
                except (TypeError, ValueError):
                    raise ValueError(f"grid parameter {name!r} must hold numbers, got {vals}") from None
                if not all(math.isfinite(v) for v in vals):
                    raise ValueError(f"grid parameter {name!r} must be finite, got {vals}")
            norm.append((str(name), tuple(vals)))
        names = [n for n, _ in norm]
        if len(set(names)) != len(names):
            raise ValueError(f"grid names must be distinct, got {names}")
        if "gap" in names and "alpha" in names:
            raise ValueError("give alpha or gap (alpha = beta + gap) in the grid, not both")
        if "r" in names and ("r_alpha" in names or "r_beta" in names):
            raise ValueError("give r (both decay exponents) or r_alpha/r_beta in the grid, not both")
        object.__setattr__(self, "grid", tuple(norm))
        try:
            times = tuple(float(t) for t in np.atleast_1d(np.asarray(self.times, dtype=float)))
        except (TypeError, ValueError):
            raise ValueError(f"times must be positive finite numbers, got {self.times!r}") from None
        if not times or any(not (math.isfinite(t) and t > 0) for t in times):
            raise ValueError(f"times must be positive finite numbers, got {self.times}")
        object.__setattr__(self, "times", tuple(sorted(set(times))))
        for name in ("dt", "lr", "t0", "loss_threshold", "alpha", "beta", "r_alpha", "r_beta",
                     "sigma", "init_std"):
            try:
                float(getattr(self, name))
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}") from None
        for name in ("K", "n", "saves", "replicates", "chunk_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, (str, bool)) or not isinstance(v, (int, float, np.number)) \
                    or not math.isfinite(v):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("dt", "lr", "t0", "loss_threshold"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
            object.__setattr__(self, name, v)
        for name in ("alpha", "beta", "r_alpha", "r_beta", "sigma", "init_std"):
            v = float(getattr(self, name))
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
            object.__setattr__(self, name, v)
        for name in ("K", "n", "saves", "replicates", "chunk_size"):
            v = getattr(self, name)
            if int(v) != v or int(v) < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
            object.__setattr__(self, name, int(v))
        if self.saves < 2:
            raise ValueError(f"saves must be >= 2, got {self.saves}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        object.__setattr__(self, "seed", int(self.seed))
        if self.p is not None:
            if isinstance(self.p, (str, bool)) or not isinstance(self.p, (int, float, np.number)) \
                    or not math.isfinite(self.p) or int(self.p) != self.p or self.p < 1:
                raise ValueError(f"p must be a positive integer or None, got {self.p!r}")
            object.__setattr__(self, "p", int(self.p))
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {self.dtype!r}")
        if self.method not in ("euler", "exact"):
            raise ValueError(f"method must be 'euler' or 'exact', got {self.method!r}")
        if self.increments not in ("gaussian", "rademacher"):
            raise ValueError(f"increments must be 'gaussian' or 'rademacher', got {self.increments!r}")
        if self.method == "exact" and self.increments != "gaussian":
            raise ValueError("increments='rademacher' is an option of the Euler scheme, not of method='exact'")
        self._check_plan_memory()
        for pt in self._structural_values():
            self._check_structure(pt)

    def _check_plan_memory(self):
        """Refuse, before building it, a grid whose plan and per-run table cannot fit."""
        from .resources import check_memory

        points = 1
        for _, vals in self.grid:
            points *= len(vals)
        runs = points * self.replicates
        # a point row (dict of ~16 entries) ~ 2 KB; a planned run ~ 150 B; a per-run table row
        # per time ~ 200 B
        need = points * 2048 + runs * (150 + 200 * len(self.times))
        check_memory(need, f"planning this sweep ({points} grid points x {self.replicates} "
                     f"replicates = {runs} runs)",
                     "sweep a coarser grid, fewer replicates, or split the grid into several sweeps")

    # ------------------------------------------------------------------------------------
    @property
    def grid_dict(self) -> Dict[str, Tuple]:
        return dict(self.grid)

    @property
    def num_points(self) -> int:
        return int(np.prod([len(v) for _, v in self.grid])) if self.grid else 1

    def points(self):
        """The grid points as a pandas DataFrame: ``point`` index, the grid values, and the
        resolved parameters (alpha, beta, r_alpha, r_beta, sigma, init_std, K, n, noise, lr, t0,
        drift) of every point."""
        import pandas as pd

        return pd.DataFrame(self._point_rows())

    def _point_rows(self):
        names = [n for n, _ in self.grid]
        rows = []
        for i, combo in enumerate(itertools.product(*[v for _, v in self.grid])):
            g = dict(zip(names, combo))
            res = {k: getattr(self, k) for k in ("alpha", "beta", "r_alpha", "r_beta", "sigma",
                                                  "init_std", "K", "n", "noise", "lr", "t0", "drift")}
            for k, v in g.items():
                if k in res:
                    res[k] = v
            if "gap" in g:
                res["alpha"] = res["beta"] + g["gap"]
            if "r" in g:
                res["r_alpha"] = res["r_beta"] = g["r"]
            row = {"point": i}
            row.update({k: g[k] for k in names if k not in res})
            row.update(res)
            rows.append(row)
        return rows

    def _structural_values(self):
        seen = []
        for row in self._point_rows():
            key = {k: row[k] for k in _STRUCTURAL}
            if key not in seen:
                seen.append(key)
        return seen

    def _check_structure(self, s):
        from .model import NoiseSpec, make_field

        if s["noise"] not in ("additive", "sgd", "both"):
            raise ValueError(f"noise must be additive, sgd or both, got {s['noise']!r}")
        NoiseSpec(s["noise"], s["lr"])
        field = make_field(s["drift"])
        p = self.p if self.p is not None else s["K"]
        field.check(p, s["K"])
        if self.comoving and (field.name != "identity" or s["noise"] != "additive"):
            raise ValueError("comoving=True is exact only for the identity drift with additive noise; "
                             f"got drift {s['drift']!r}, noise {s['noise']!r}")
        if self.method == "exact" and (field.name not in ("identity", "label_projection")
                                       or s["noise"] != "additive"):
            raise ValueError("method='exact' samples the linear drifts (identity, label_projection) with "
                             f"additive noise only; got drift {s['drift']!r}, noise {s['noise']!r}")

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = [[name, list(vals)] for name, vals in self.grid]
        d["times"] = list(self.times)
        for name, default in (("method", "euler"), ("increments", "gaussian")):
            if d[name] == default:  # older sweeps have no such field: same config, same digest
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PhaseSpec":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PhaseSpec fields {sorted(unknown)}")
        d["grid"] = tuple((name, tuple(vals)) for name, vals in d["grid"])
        d["times"] = tuple(d.get("times", (400.0,)))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self) -> str:
        """A short hash of the configuration (names the sweep)."""
        return self.fingerprint()[:12]

    def fingerprint(self) -> str:
        """SHA-256 of the configuration (and the sweep format version); every chunk file of a
        sweep carries it, so that chunks of another sweep are recognised and refused."""
        text = f"lesde-phase-sweep/{PHASE_FORMAT_VERSION}/" + self.to_json()
        return hashlib.sha256(text.encode()).hexdigest()

    def save_times(self) -> np.ndarray:
        """The save grid: ``saves`` equally spaced times on [0, max(times)] plus the times."""
        grid = np.linspace(0.0, max(self.times), self.saves)
        return np.unique(np.concatenate([grid, np.asarray(self.times)]))

    def chunks(self):
        """The chunk plan: a list of dicts with the structural values and the (point, replicate)
        pairs of each chunk, in a fixed order (structural groups in order of first appearance)."""
        rows = self._point_rows()
        groups: Dict[tuple, list] = {}
        for row in rows:
            key = tuple(row[k] for k in _STRUCTURAL)
            groups.setdefault(key, []).append(row["point"])
        plan = []
        for key, pts in groups.items():
            runs = [(pt, rep) for pt in pts for rep in range(self.replicates)]
            for s in range(0, len(runs), self.chunk_size):
                plan.append({"structure": dict(zip(_STRUCTURAL, key)), "runs": runs[s:s + self.chunk_size]})
        return plan


# ============================================================================================
# one chunk
# ============================================================================================
def _chunk_seeds(seed: int, index: int) -> Tuple[int, int]:
    state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(2, dtype=np.uint64)
    return int(state[0] % (2 ** 62)), int(state[1] % (2 ** 62))


def _impacts(spec: PhaseSpec, K: int, t0: float, a0, b0, ra, rb):
    from .model import Constant, Impacts, PowerLaw

    constant = not (np.any(ra != 0) or np.any(rb != 0))
    alpha = Constant(a0, "alpha") if constant else PowerLaw(a0, ra, t0)
    beta = Constant(b0, "beta") if constant else PowerLaw(b0, rb, t0)
    if not spec.comoving:
        return Impacts.intra_inter(alpha, beta, K)
    proj = np.eye(K) - np.ones((K, K)) / K
    if constant:
        return Impacts((a0 - b0)[:, None, None] * proj)
    return Impacts(lambda t: (alpha(t) - beta(t))[:, None, None] * proj)


def _first_true(flags: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """flags (S, B) over save times -> first time each column is True (NaN if never)."""
    hit = flags.any(0)
    idx = flags.argmax(0)
    return np.where(hit, ts[idx], np.nan)


@np.errstate(all="ignore")  # overflowed runs are scored as NaN, silently
def _run_chunk(spec_dict: dict, index: int, threads: Optional[int] = None):
    """Simulate and score chunk ``index`` of the sweep; returns a DataFrame with one row per
    (run, T). Runs in a worker process for Dask, so it takes the spec as a plain dict."""
    import pandas as pd
    import torch

    from . import metrics
    from .model import LESDE
    from .solvers import initial_state, simulate

    if threads is not None:
        torch.set_num_threads(int(threads))
    spec = PhaseSpec.from_dict(spec_dict)
    plan = spec.chunks()
    if not 0 <= index < len(plan):
        raise ValueError(f"chunk index {index} out of range 0..{len(plan) - 1}")
    chunk = plan[index]
    s = chunk["structure"]
    rows = spec._point_rows()
    runs = chunk["runs"]
    pts = np.array([pt for pt, _ in runs])
    reps = np.array([rep for _, rep in runs])

    def col(name):
        return np.array([rows[pt][name] for pt in pts], dtype=float)

    K, n = int(s["K"]), int(s["n"])
    p = spec.p if spec.p is not None else K
    B, N = len(runs), K * n
    y = np.repeat(np.arange(K), n)
    impacts = _impacts(spec, K, float(s["t0"]), col("alpha"), col("beta"), col("r_alpha"), col("r_beta"))
    sgd = s["noise"] in ("sgd", "both")
    sde = LESDE(y, impacts, s["drift"], sigma=col("sigma"), noise=s["noise"],
                lr=float(s["lr"]) if sgd else None, dim=p)
    seed_x0, seed_sim = _chunk_seeds(spec.seed, index)
    dtype = getattr(torch, spec.dtype)
    x0 = initial_state(B, N, p, std=1.0, seed=seed_x0, dtype=dtype)
    x0 = x0 * torch.as_tensor(col("init_std"), dtype=dtype)[:, None, None]
    ts = spec.save_times()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = simulate(sde, x0, ts, spec.dt, seed=seed_sim, record="full", dtype=dtype,
                       method=spec.method, increments=spec.increments)
    X = sol.states                                                     # (S, B, N, p)
    logits = sde.field.name == "cross_entropy"
    finite = np.isfinite(X).all(axis=(2, 3))                           # (S, B)
    ncc = np.asarray(metrics.ncc_accuracy(X, y, num_classes=K))       # (S, B), NaN if not finite
    if logits:
        loss = np.asarray(metrics.cross_entropy(X, y))
        acc = np.asarray(metrics.argmax_accuracy(X, y))
        order = acc == 1.0
    else:
        loss = np.full(ncc.shape, np.nan)
        acc = np.full(ncc.shape, np.nan)
        order = ncc == 1.0
    # A run whose scores are not finite although its state is (features beyond the range in
    # which a measure can be computed) is counted as overflow, never scored "not separable".
    # The nearest-centre accuracy is finite for every finite state (metrics rescales exactly),
    # so this is a safety net.
    finite &= np.isfinite(ncc)
    if logits:
        finite &= np.isfinite(loss) & np.isfinite(acc)
    out = []
    for T in spec.times:
        i = int(np.flatnonzero(np.isclose(ts, T))[0])
        Xi = X[i]
        ok = finite[i]
        nc1 = np.full(B, np.nan)
        if ok.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nc1[ok] = np.asarray(metrics.nc1(Xi[ok], y, num_classes=K)).reshape(-1)
        lp = np.full(B, np.nan)
        if spec.lp:
            for b in np.flatnonzero(ok):
                if acc[i, b] == 1.0 or ncc[i, b] == 1.0:
                    lp[b] = 1.0  # an affine classifier (the read-out or NCC) already separates
                else:
                    lp[b] = float(metrics.linear_separability(Xi[b], y, num_classes=K).separable)
        t_first = _first_true(order[: i + 1], ts[: i + 1])

        def flag(v):
            return np.where(ok, np.asarray(v, dtype=float), np.nan)

        sep_readout = flag(acc[i] == 1.0) if logits else np.full(B, np.nan)
        sep_loss = flag(loss[i] < spec.loss_threshold) if logits else np.full(B, np.nan)
        sep_ncc = flag(ncc[i] == 1.0)
        out.append(pd.DataFrame({
            "chunk": index, "point": pts, "replicate": reps, "T": T,
            "sep": sep_readout if logits else sep_ncc,
            "sep_readout": sep_readout, "sep_loss": sep_loss, "sep_ncc": sep_ncc, "sep_lp": lp,
            "loss": loss[i], "accuracy": acc[i], "ncc_accuracy": ncc[i], "nc1": nc1,
            "t_sep": np.where(ok, t_first, np.nan),
            "overflow": (~ok).astype(float),
        }))
    df = pd.concat(out, ignore_index=True)
    df["spec_sha256"] = spec.fingerprint()
    return df.sort_values(["point", "replicate", "T"], kind="stable").reset_index(drop=True)


# ============================================================================================
# aggregation
# ============================================================================================
def summarize_runs(runs, spec: PhaseSpec):
    """Per-run rows (from the chunks) -> the tidy per-(point, T) table.

    Columns: ``point``, the grid and resolved parameters (see :meth:`PhaseSpec.points`), ``T``,
    ``notion`` (which order parameter ``p_sep`` is: "readout accuracy 1" or "NCC accuracy 1"),
    ``runs`` (R), ``p_sep``, ``p_readout``, ``p_loss``, ``p_ncc``, ``p_lp`` with ``_se``
    (binomial), ``t_sep_mean``/``t_sep_se`` (over separated replicates), ``loss``, ``accuracy``,
    ``ncc_accuracy``, ``nc1`` ``_mean``/``_se``, ``p_overflow``.
    """
    import pandas as pd

    points = spec.points()
    out = []
    for (pt, T), g in runs.groupby(["point", "T"], sort=True):
        good = g[g["overflow"] == 0]
        R = len(good)
        row = {"point": pt, "T": T, "runs": len(g), "p_overflow": float(g["overflow"].mean())}
        for name, colname in (("sep", "sep"), ("readout", "sep_readout"), ("loss", "sep_loss"),
                              ("ncc", "sep_ncc"), ("lp", "sep_lp")):
            v = good[colname].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            pr = float(v.mean()) if v.size else np.nan
            row[f"p_{name}"] = pr
            row[f"p_{name}_se"] = float(math.sqrt(pr * (1 - pr) / v.size)) if v.size else np.nan
        t = good["t_sep"].to_numpy(dtype=float)
        t = t[np.isfinite(t)]
        row["t_sep_mean"] = float(t.mean()) if t.size else np.nan
        row["t_sep_se"] = float(t.std(ddof=1) / math.sqrt(t.size)) if t.size > 1 else np.nan
        for m in _MEASURES:
            v = good[m].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            row[f"{m}_mean"] = float(v.mean()) if v.size else np.nan
            row[f"{m}_se"] = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else np.nan
        out.append(row)
    stats = pd.DataFrame(out)
    table = points.merge(stats, on="point", how="inner")
    table.insert(table.columns.get_loc("T") + 1, "notion",
                 np.where(table["drift"].isin(_LOGIT_FIELDS), "readout accuracy 1", "NCC accuracy 1"))
    return table.sort_values(["point", "T"], kind="stable").reset_index(drop=True)


# ============================================================================================
# the sweep driver
# ============================================================================================
def _chunk_path(directory, index):
    return os.path.join(directory, "chunks", f"chunk_{index:06d}.parquet")


_CHUNK_RE = None


def _chunk_files(directory) -> Dict[int, str]:
    """index -> path of every ``chunks/chunk_<i>.parquet`` in the directory."""
    import re

    global _CHUNK_RE
    if _CHUNK_RE is None:
        _CHUNK_RE = re.compile(r"^chunk_(\d+)\.parquet$")
    folder = os.path.join(directory, "chunks")
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in os.listdir(folder):
        m = _CHUNK_RE.match(name)
        if m:
            out[int(m.group(1))] = os.path.join(folder, name)
    return out


def _write_atomic_parquet(df, path):
    from .storage import atomic_write

    with atomic_write(path, "wb") as f:
        df.to_parquet(f, index=False)


def _read_parquet(path, what):
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as exc:
        raise ValueError(f"{what} {path} is unreadable, truncated or corrupt ({type(exc).__name__}: "
                         f"{exc}); delete it and rerun the same command to recompute it") from None


def _check_rows(df, path, spec: PhaseSpec, what):
    """The rows of a chunk (or of runs.parquet) carry this sweep's fingerprint."""
    fp = spec.fingerprint()
    if "spec_sha256" not in df.columns:
        raise ValueError(f"{what} {path} carries no sweep fingerprint (written by an older lesde or "
                         "another program), so it cannot be tied to this sweep; delete it and rerun "
                         "the same command to recompute it")
    found = sorted(set(df["spec_sha256"].astype(str)))
    if found != [fp]:
        other = ", ".join(f[:12] for f in found if f != fp) or "none"
        raise ValueError(f"{what} {path} belongs to another sweep (spec fingerprint {other}, this "
                         f"sweep {fp[:12]}); remove it, or run that sweep in its own directory")
    missing = [c for c in ("chunk", "point", "replicate", "T", "overflow") + _FLAGS + _MEASURES
               if c not in df.columns]
    if missing:
        raise ValueError(f"{what} {path} lacks the columns {missing}; delete it and rerun")


def _read_chunk(directory, index, spec: PhaseSpec, plan):
    path = _chunk_path(directory, index)
    df = _read_parquet(path, "sweep chunk")
    _check_rows(df, path, spec, "sweep chunk")
    expect = len(plan[index]["runs"]) * len(spec.times)
    if len(df) != expect or not (df["chunk"] == index).all():
        raise ValueError(f"sweep chunk {path} does not hold chunk {index} of this sweep "
                         f"({len(df)} rows, expected {expect}); delete it and rerun to recompute it")
    return df


def _read_config(directory):
    """The parsed ``config.json`` of a sweep directory (None when absent); clear errors."""
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        return None
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"sweep configuration {cfg_path} is truncated or not valid JSON ({exc}); "
                         "restore it, or delete the directory to start the sweep again") from None
    if cfg.get("format") != "lesde-phase-sweep":
        raise ValueError(f"{cfg_path} is not a lesde phase-sweep configuration")
    if cfg.get("format_version") != PHASE_FORMAT_VERSION:
        raise ValueError(f"{directory} holds a sweep of format version {cfg.get('format_version')}; "
                         f"this lesde reads and writes version {PHASE_FORMAT_VERSION}")
    if not isinstance(cfg.get("spec"), dict):
        raise ValueError(f"{cfg_path} has no 'spec' object")
    return cfg


def _check_directory(directory, spec: PhaseSpec, plan) -> bool:
    """Read-only checks of an existing sweep directory against ``spec``. Returns whether a
    configuration is already there. Refuses another spec's directory, chunks without a
    config.json, and chunk files that are not chunks of this sweep's plan."""
    cfg = _read_config(directory)
    chunks = _chunk_files(directory)
    if cfg is None:
        if chunks or os.path.exists(os.path.join(directory, "runs.parquet")):
            raise ValueError(
                f"{directory} holds {len(chunks)} chunk file(s) of a sweep but no config.json, so "
                "they cannot be tied to a spec; restore config.json, or delete "
                f"{os.path.join(directory, 'chunks')} (and runs.parquet) to start over, or use "
                "another directory")
        return False
    old = cfg["spec"]
    new = json.loads(json.dumps(spec.to_dict()))
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"{directory} already holds a sweep with a different configuration "
                         f"(differs in: {', '.join(diff)}); use another directory or the same spec")
    extra = sorted(i for i in chunks if i >= len(plan))
    if extra:
        raise ValueError(f"{chunks[extra[0]]} is not a chunk of this sweep (it has {len(plan)} "
                         "chunks); remove it, or run its sweep in its own directory")
    return True


def _check_chunk_fingerprints(directory, spec: PhaseSpec) -> None:
    """Every chunk file carries this sweep's fingerprint (reads one column of each)."""
    import pandas as pd

    fp = spec.fingerprint()
    for i, path in sorted(_chunk_files(directory).items()):
        try:
            col = pd.read_parquet(path, columns=["spec_sha256"])["spec_sha256"]
        except Exception:
            col = None
        if col is None or set(col.astype(str)) != {fp}:
            _check_rows(_read_parquet(path, "sweep chunk"), path, spec, "sweep chunk")


def _finished(directory, spec: PhaseSpec):
    """The per-run rows of a finished sweep in ``directory`` (None if not finished)."""
    runs_path = os.path.join(directory, "runs.parquet")
    if not (os.path.exists(runs_path) and os.path.exists(os.path.join(directory, "table.csv"))):
        return None
    runs = _read_parquet(runs_path, "sweep results")
    _check_rows(runs, runs_path, spec, "sweep results")
    _check_chunk_fingerprints(directory, spec)
    return runs


def chunk_bytes(spec: PhaseSpec, chunk: dict) -> int:
    """Peak memory (bytes, an estimate erring high) of simulating and scoring one chunk: the
    simulation (:func:`lesde.solvers.simulation_bytes`, full states at every save time) and
    the scoring of all save times at once (float64 copies and per-class scores)."""
    from .solvers import simulation_bytes

    s = chunk["structure"]
    K, n = int(s["K"]), int(s["n"])
    p = spec.p if spec.p is not None else K
    B, N, S = len(chunk["runs"]), K * n, len(spec.save_times())
    itemsize = 8 if spec.dtype == "float64" else 4
    sim = simulation_bytes(B, N, p, K, S, "full", itemsize, s["noise"] in ("sgd", "both"))
    return sim + 8 * S * B * N * (3 * p + 4 * K)


def _check_chunk_memory(spec: PhaseSpec, plan, parallel: int = 1) -> None:
    from .resources import check_memory

    if not plan:
        return
    worst = max(plan, key=lambda c: chunk_bytes(spec, c))
    need = chunk_bytes(spec, worst) * max(1, int(parallel))
    s = worst["structure"]
    what = (f"one sweep chunk ({len(worst['runs'])} runs of N = {int(s['K']) * int(s['n'])} "
            f"samples, {len(spec.save_times())} save times)")
    if parallel > 1:
        what = f"{parallel} sweep chunks at once, each {what[4:]}"
    check_memory(need, what, "use a smaller chunk_size (--chunk-size), fewer save times "
                 "(--saves)" + (", or fewer workers" if parallel > 1 else ""))


def _prepare_check(spec: PhaseSpec, directory, plan=None):
    """Before any work: the table of a sweep already finished in ``directory`` (read, nothing
    written), or None after checking that the directory belongs to ``spec`` (or is new) and can
    be written."""
    from .storage import check_output_path

    directory = os.fspath(directory)
    plan = spec.chunks() if plan is None else plan
    if os.path.isdir(directory) and _check_directory(directory, spec, plan):
        runs = _finished(directory, spec)
        if runs is not None:
            table = summarize_runs(runs.drop(columns="spec_sha256"), spec)
            table.attrs.update({"complete": True, "spec": spec.to_dict()})
            return table
    check_output_path(directory, "sweep directory", directory=True)
    return None


def run_sweep(spec: PhaseSpec, directory: Optional[str] = None, *, client=None,
              max_chunks: Optional[int] = None, threads: Optional[int] = None,
              progress: bool = False):
    r"""Run (or resume) a phase sweep; returns the tidy per-(point, T) table (pandas).

    Parameters
    ----------
    spec : :class:`PhaseSpec`.
    directory : sweep directory. ``config.json`` (the spec), ``chunks/chunk_<i>.parquet`` (one
        per finished chunk, written as it finishes, atomically, each carrying the spec's
        :meth:`~PhaseSpec.fingerprint`) and, once all chunks are done, ``runs.parquet``
        (per-run rows) and ``table.csv``. Existing chunks are reused (resume); a directory made
        with another configuration, chunk files of another sweep, and chunks without a
        ``config.json`` are refused (``ValueError``). A finished sweep returns its table at once
        without writing anything. One process writes a directory at a time (a second gets
        :class:`lesde.storage.DirectoryLockedError`); temporary files left by a killed run are
        removed. None: nothing is written.
    client : a ``distributed.Client``; chunks are then submitted as tasks (one torch thread
        each unless ``threads`` says otherwise) and written by this process as they complete.
        None: in-process.
    max_chunks : compute at most this many new chunks, then stop (the table then covers the
        finished chunks only and ``table.attrs["complete"]`` is False).
    threads : torch threads for the chunks (in-process default: unchanged).
    progress : show a progress bar over chunks.

    Before computing, the memory of the largest chunk is estimated (:func:`chunk_bytes`) and a
    chunk that cannot fit is refused (:class:`lesde.resources.InsufficientMemoryError`).

    Returns
    -------
    pandas.DataFrame, see :func:`summarize_runs`; ``attrs`` carry ``complete`` and ``spec``
    (dict). The per-run rows are in ``directory/runs.parquet``.
    """
    if not isinstance(spec, PhaseSpec):
        raise ValueError("spec must be a lesde.phase.PhaseSpec")
    if max_chunks is not None and (isinstance(max_chunks, bool) or int(max_chunks) != max_chunks
                                   or max_chunks < 0):
        raise ValueError(f"max_chunks must be a non-negative integer, got {max_chunks}")
    if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads}")
    plan = spec.chunks()
    if directory is None:
        return _sweep(spec, None, plan, client, max_chunks, threads, progress)
    from .storage import DirectoryLock, remove_stale_temporaries

    directory = os.fspath(directory)
    finished = _prepare_check(spec, directory, plan)
    if finished is not None:  # finished: nothing to write
        return finished
    if client is None:
        _check_chunk_memory(spec, plan)
    os.makedirs(os.path.join(directory, "chunks"), exist_ok=True)
    with DirectoryLock(directory, "sweep directory"):
        # checked again under the lock: another writer may have changed the directory
        has_config = _check_directory(directory, spec, plan)
        remove_stale_temporaries(directory)
        remove_stale_temporaries(os.path.join(directory, "chunks"))
        if not has_config:
            from .storage import atomic_write

            want = {"format": "lesde-phase-sweep", "format_version": PHASE_FORMAT_VERSION,
                    "spec": spec.to_dict()}
            with atomic_write(os.path.join(directory, "config.json"), "w") as f:
                json.dump(want, f, indent=1, sort_keys=True)
        return _sweep(spec, directory, plan, client, max_chunks, threads, progress)


def _sweep(spec, directory, plan, client, max_chunks, threads, progress):
    import pandas as pd

    done: Dict[int, object] = {}
    if directory is not None:
        for i in sorted(_chunk_files(directory)):
            done[i] = _read_chunk(directory, i, spec, plan)
    todo = [i for i in range(len(plan)) if i not in done]
    if max_chunks is not None:
        todo = todo[: int(max_chunks)]
    spec_dict = spec.to_dict()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), initial=len(done), desc="lesde phase", unit="chunk")

    def finish(i, df):
        done[i] = df
        if directory is not None:
            _write_atomic_parquet(df, _chunk_path(directory, i))
        if bar is not None:
            bar.update(1)

    try:
        if client is None:
            for i in todo:
                finish(i, _run_chunk(spec_dict, i, threads))
        else:
            from distributed import as_completed

            futures = {client.submit(_run_chunk, spec_dict, i, threads if threads else 1, pure=False): i
                       for i in todo}
            for fut in as_completed(list(futures)):
                finish(futures[fut], fut.result())
    finally:
        if bar is not None:
            bar.close()
    complete = len(done) == len(plan)
    if not done:
        raise ValueError("no chunk finished (max_chunks=0 on a new sweep?)")
    runs = pd.concat([done[i] for i in sorted(done)], ignore_index=True)
    runs = runs.sort_values(["point", "replicate", "T"], kind="stable").reset_index(drop=True)
    table = summarize_runs(runs.drop(columns="spec_sha256"), spec)
    if directory is not None and complete:
        from .storage import atomic_write

        _write_atomic_parquet(runs, os.path.join(directory, "runs.parquet"))
        with atomic_write(os.path.join(directory, "table.csv"), "w", newline="") as f:
            table.to_csv(f, index=False)
    table.attrs.update({"complete": complete, "spec": spec_dict})
    return table


def load_sweep(directory: str):
    """Read a sweep directory: returns ``(spec, table)`` with the table recomputed from
    ``runs.parquet`` (or from the chunks of an unfinished sweep, ``attrs["complete"]`` False).
    Files that do not belong to the sweep's spec are refused (``ValueError`` naming them)."""
    import pandas as pd

    directory = os.fspath(directory)
    cfg = _read_config(directory)
    if cfg is None:
        raise FileNotFoundError(f"no sweep at {directory} (config.json missing)")
    try:
        spec = PhaseSpec.from_dict(cfg["spec"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{os.path.join(directory, 'config.json')}: not a valid sweep "
                         f"specification ({exc})") from None
    plan = spec.chunks()
    _check_directory(directory, spec, plan)
    runs_path = os.path.join(directory, "runs.parquet")
    if os.path.exists(runs_path):
        runs, complete = _read_parquet(runs_path, "sweep results"), True
        _check_rows(runs, runs_path, spec, "sweep results")
        _check_chunk_fingerprints(directory, spec)
    else:
        parts = [_read_chunk(directory, i, spec, plan) for i in sorted(_chunk_files(directory))]
        if not parts:
            raise ValueError(f"{directory}: no finished chunk yet")
        runs, complete = pd.concat(parts, ignore_index=True), len(parts) == len(plan)
    table = summarize_runs(runs.drop(columns="spec_sha256"), spec)
    table.attrs.update({"complete": complete, "spec": spec.to_dict()})
    return spec, table


# ============================================================================================
# neural collapse over time
# ============================================================================================
def collapse_over_time(states, labels, readout="identity", runs: Optional[Sequence[str]] = None):
    r"""Neural-collapse measures of recorded states at every time, as a tidy table.

    ``states``: ``(T, B, N, p)`` (e.g. ``Solution.states``), ``labels``: ``(N,)``. With
    ``readout="identity"`` the features are logits (p = K) and the read-out is ``W = I``: NC3 is
    taken with the centred identity (itself a simplex ETF, see :func:`lesde.metrics.nc3`) and
    NC4 with the argmax of the logits; ``readout=None`` leaves NC3/NC4 out. Returns a DataFrame
    with columns ``time_index``, ``run`` (or the names in ``runs``), ``nc1``, ``equinorm``,
    ``equiangularity``, ``etf_angle``, ``nc3``, ``nc4``, ``loss`` and ``accuracy`` (logits only).
    NC definitions: Papyan, Han & Donoho, PNAS 2020 (background.md section 3).
    """
    import pandas as pd

    from . import metrics

    X = np.asarray(states, dtype=float)
    if X.ndim != 4:
        raise ValueError(f"states must have shape (T, B, N, p), got {X.shape}")
    y = np.asarray(labels)
    K = int(y.max()) + 1
    W = None
    if readout == "identity":
        if X.shape[-1] != K:
            raise ValueError(f"readout='identity' needs logit features p = K = {K}, got p = {X.shape[-1]}")
        W = np.eye(K)
    elif readout is not None:
        raise ValueError(f"readout must be 'identity' or None, got {readout!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nc = metrics.neural_collapse(X, y, W=W, num_classes=K, center_W=True).as_dict()
        if W is not None:
            nc["loss"] = metrics.cross_entropy(X, y)
            nc["accuracy"] = metrics.argmax_accuracy(X, y)
    T, B = X.shape[:2]
    names = list(runs) if runs is not None else list(range(B))
    if len(names) != B:
        raise ValueError(f"runs must name the B = {B} runs, got {len(names)} names")
    frame = {"time_index": np.repeat(np.arange(T), B), "run": np.tile(np.array(names, dtype=object), T)}
    for k, v in nc.items():
        if v is not None:
            frame[k] = np.asarray(v, dtype=float).reshape(-1)
    return pd.DataFrame(frame)
