r"""Trajectory input: any log of per-sample features over time as one array layout.

A :class:`Trajectory` holds the features of N tracked samples at T logged times in R independent
trials, ``(R, T, N, p)``, their labels ``(N,)`` and the times ``(T,)``. :func:`as_trajectory`
builds one from

* a simulation (:class:`~lesde.solvers.Solution`, or the ``.npz`` file that
  :meth:`Solution.save` / ``lesde simulate`` writes: its runs become trials);
* a logged training run (:class:`~lesde.tracking.TrajectoryStore`, or its directory), read
  through the store's public API at the lr-scaled times ``store.time``;
* an ``.npz`` log written by any code: ``features`` ``(T, N, p)`` or ``(R, T, N, p)``,
  ``labels`` ``(N,)``, ``ts`` ``(T,)``; optionally ``split`` ``(N,)`` (0 train, 1 test),
  ``class_weights`` ``(K,)`` and ``num_classes``. The array may also be named after ``what``
  (``logits``) and the times ``time``, so the summaries committed beside the real runs load as
  they are. Files are read with ``allow_pickle=False``: a file that needs unpickling is refused;
* plain arrays, a tuple ``(ts, features, labels)``, or a list of logs (trials of one fit).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["Trajectory", "as_trajectory"]


@dataclass(frozen=True, eq=False)
class Trajectory:
    r"""Feature trajectories of N tracked samples over T times, in R independent trials.

    Parameters
    ----------
    ts : (T,) strictly increasing times (lr-scaled training time ``step * lr``), T >= 2.
    features : (T, N, p) for one trial or (R, T, N, p) for R independent trials (same labels and
        times, e.g. repeated training runs or ``simulate(..., num_runs=R)``).
    labels : (N,) integer labels in 0..K-1, every class non-empty.
    num_classes : K (default ``labels.max() + 1``).
    class_weights : (K,) the shares n_k/N of the classes in the *whole training set* that enter
        the drift ``sum_k E[c, k] (n_k/N) Gbar_k``; default: the shares among the tracked samples.

    After construction ``features`` is always a float64 array of shape (R, T, N, p).
    """

    ts: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    num_classes: Optional[int] = None
    class_weights: Optional[np.ndarray] = None

    def __post_init__(self):
        ts = np.asarray(self.ts, dtype=float)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"ts must have shape (T,) with T >= 2 logged times, got shape "
                             f"{ts.shape}: a fit needs at least one interval")
        if not np.all(np.isfinite(ts)) or np.any(np.diff(ts) <= 0):
            raise ValueError("ts must be finite and strictly increasing")
        x = np.asarray(self.features, dtype=float)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"features must have shape (T, N, p) or (R, T, N, p), got {x.shape}")
        if x.shape[1] != ts.shape[0]:
            raise ValueError(f"features has {x.shape[1]} times but ts has {ts.shape[0]}: "
                             f"expected features of shape (R, T={ts.shape[0]}, N, p)")
        if not np.all(np.isfinite(x)):
            bad = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(f"features contain non-finite values (first at trial {bad[0]}, time "
                             f"index {bad[1]}, sample {bad[2]}): an overflowed or corrupt run?")
        y = np.asarray(self.labels)
        if y.ndim != 1 or y.shape[0] != x.shape[2]:
            raise ValueError(f"labels must have shape (N,) = ({x.shape[2]},) to match features, "
                             f"got {y.shape}")
        yf = np.asarray(y, dtype=float)
        if y.size and not np.all(yf == np.round(yf)):
            raise ValueError("labels must be integers")
        y = y.astype(np.int64)
        K = int(self.num_classes) if self.num_classes is not None else int(y.max()) + 1
        if K < 2:
            raise ValueError(f"need at least K = 2 classes, got K = {K}")
        if y.min() < 0 or y.max() >= K:
            raise ValueError(f"labels must lie in 0..K-1 = 0..{K - 1}, got {y.min()}..{y.max()}")
        counts = np.bincount(y, minlength=K)
        if np.any(counts == 0):
            raise ValueError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no tracked "
                             f"samples; every class 0..{K - 1} needs at least one")
        if self.class_weights is None:
            w = counts / counts.sum()
        else:
            w = np.asarray(self.class_weights, dtype=float)
            if w.shape != (K,) or np.any(w <= 0) or not np.all(np.isfinite(w)):
                raise ValueError(f"class_weights must be K = {K} positive shares n_k/N, got {w}")
            w = w / w.sum()
        object.__setattr__(self, "ts", ts)
        object.__setattr__(self, "features", x)
        object.__setattr__(self, "labels", y)
        object.__setattr__(self, "num_classes", K)
        object.__setattr__(self, "class_weights", w)

    def __repr__(self) -> str:
        return (f"Trajectory(R={self.R}, T={self.T}, N={self.N}, p={self.p}, K={self.K}, "
                f"t={self.ts[0]:g}..{self.ts[-1]:g})")

    @property
    def R(self) -> int:
        """Number of independent trials."""
        return self.features.shape[0]

    @property
    def T(self) -> int:
        return self.features.shape[1]

    @property
    def N(self) -> int:
        return self.features.shape[2]

    @property
    def p(self) -> int:
        return self.features.shape[3]

    @property
    def K(self) -> int:
        return int(self.num_classes)

    @property
    def counts(self) -> np.ndarray:
        """(K,) tracked samples per class."""
        return np.bincount(self.labels, minlength=self.K)

    @property
    def balanced(self) -> bool:
        return bool(np.allclose(self.class_weights, 1.0 / self.K, rtol=1e-9, atol=0))

    def class_means(self) -> np.ndarray:
        """(R, T, K, p) class means of the tracked samples."""
        return class_means(self.features, self.labels, self.K)

    def subset(self, times=None, trials=None) -> "Trajectory":
        """The same samples at a subset of time indices and/or trials (e.g. the early part of a
        log for held-out prediction: ``traj.subset(times=slice(0, 60))``)."""
        x = self.features
        ts = self.ts
        if trials is not None:
            x = x[np.atleast_1d(np.arange(self.R)[trials])]
        if times is not None:
            idx = np.atleast_1d(np.arange(self.T)[times])
            x, ts = x[:, idx], ts[idx]
        return Trajectory(ts, x, self.labels, num_classes=self.K,
                          class_weights=self.class_weights)

    def require_per_class(self, minimum: int, why: str) -> None:
        """Raise ValueError naming the class when a class has fewer than ``minimum`` samples."""
        small = np.flatnonzero(self.counts < minimum)
        if small.size:
            raise ValueError(f"class {int(small[0])} has {int(self.counts[small[0]])} tracked "
                             f"sample(s); {why} needs at least {minimum} per class")


def class_means(x: np.ndarray, labels: np.ndarray, K: int) -> np.ndarray:
    """Class means of x (..., N, q) over the samples of each label: (..., K, q)."""
    weights = (np.eye(K)[labels] / np.bincount(labels, minlength=K)).T     # (K, N)
    return np.matmul(weights, x)


def _is_store(obj) -> bool:
    return hasattr(obj, "group") and hasattr(obj, "split") and hasattr(obj, "array")


def _select_split(split_arr, split: str, what_source: str) -> np.ndarray:
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    s = np.asarray(split_arr)
    sel = {"train": s == 0, "test": s == 1, "all": np.ones_like(s, dtype=bool)}[split]
    if not np.any(sel):
        raise ValueError(f"{what_source} has no tracked {split} samples")
    return sel


def as_trajectory(source, *, what: str = "logits", split: str = "train",
                  labels=None, ts=None, class_weights=None) -> Trajectory:
    """Turn a simulation, a training log, a file or arrays into a :class:`Trajectory`.

    Parameters
    ----------
    source :
        * a :class:`Trajectory` (returned as is);
        * a :class:`~lesde.solvers.Solution` recorded with ``record="full"``: its B runs become
          R = B independent trials (same labels, same times);
        * a :class:`~lesde.tracking.TrajectoryStore` or its directory: the ``what`` array
          ("logits", default, or "features") of the tracked samples of ``split`` ("train",
          default, "test" or "all") at the logged lr-scaled times ``store.time``;
        * the path of an ``.npz`` file: a ``lesde simulate`` solution, or a log with
          ``features`` (or an array named ``what``) ``(T, N, p)`` / ``(R, T, N, p)``,
          ``labels (N,)`` and ``ts`` (or ``time``) ``(T,)``, optionally ``split (N,)``
          (0 train, 1 test; selected by ``split``), ``class_weights (K,)``, ``num_classes``;
        * an array of features (T, N, p) or (R, T, N, p), with ``labels`` and ``ts`` given;
        * a tuple ``(ts, features, labels)``;
        * a list of any of these: independent runs (e.g. other seeds) with the same logged times
          and the same tracked labels, stacked as trials. Several runs identify the full E of
          the cross-entropy field, which one run does not.
    class_weights : (K,) shares of the classes in the training set (see :class:`Trajectory`).
    """
    if isinstance(source, Trajectory):
        return source
    if isinstance(source, list):
        return _stack_runs(source, what=what, split=split, class_weights=class_weights)
    from ..solvers import Solution

    if isinstance(source, Solution):
        if source.states is None:
            raise ValueError("the Solution has no states: simulate with record='full' to fit "
                             "per-sample trajectories")
        if np.any(source.overflowed):
            raise ValueError(f"the Solution has overflowed runs "
                             f"{np.flatnonzero(source.overflowed).tolist()}: drop them first")
        return Trajectory(source.ts, np.transpose(source.states, (1, 0, 2, 3)), source.labels,
                          num_classes=source.K, class_weights=class_weights)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            from ..tracking import load_store

            source = load_store(path)
        elif os.path.isfile(path):
            return _from_npz(path, what=what, split=split, class_weights=class_weights)
        else:
            raise FileNotFoundError(f"no log at {path}: expected a trajectory store directory, a "
                                    "lesde simulate solution (.npz) or an .npz with features, "
                                    "labels and ts")
    if _is_store(source):
        if what not in ("logits", "features"):
            raise ValueError(f"what must be 'logits' or 'features', got {what!r}")
        sel = _select_split(source.split, split, "the store")
        x = source.array(what)[:, sel]
        return Trajectory(source.time, x, source.labels[sel],
                          num_classes=source.config.num_classes, class_weights=class_weights)
    if isinstance(source, tuple) and len(source) == 3:
        return Trajectory(source[0], source[1], source[2], class_weights=class_weights)
    if labels is None or ts is None:
        raise ValueError("an array source needs labels (N,) and ts (T,); or pass a Trajectory, "
                         "a Solution, a TrajectoryStore, a file path or a tuple "
                         "(ts, features, labels)")
    return Trajectory(ts, source, labels, class_weights=class_weights)


def _from_npz(path: str, *, what: str, split: str, class_weights) -> Trajectory:
    """An ``.npz`` file: a lesde simulate solution, or a log with features / labels / ts."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:                       # noqa: BLE001 - any unreadable file
        raise ValueError(f"{path} is not a readable .npz file ({exc})") from exc
    if not hasattr(data, "files"):
        raise ValueError(f"{path} holds a single array, not an .npz archive with features, "
                         "labels and ts")
    with data:
        files = set(data.files)
        if "format_version" in files and "class_means" in files:
            from ..solvers import Solution

            return as_trajectory(Solution.load(path), class_weights=class_weights)
        key = what if what in files else ("features" if "features" in files else None)
        tkey = "ts" if "ts" in files else ("time" if "time" in files else None)
        missing = [name for name, k in (("features (or " + repr(what) + ")", key),
                                        ("ts (or time)", tkey),
                                        ("labels", "labels" if "labels" in files else None))
                   if k is None]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}; an .npz log needs features "
                             f"(T, N, p) or (R, T, N, p), labels (N,) and ts (T,); found "
                             f"{sorted(files)}")
        try:
            x = np.asarray(data[key])
            times = np.asarray(data[tkey])
            y = np.asarray(data["labels"])
            sp = np.asarray(data["split"]) if "split" in files else None
            cw = np.asarray(data["class_weights"]) if "class_weights" in files else None
            K = int(data["num_classes"]) if "num_classes" in files else None
        except ValueError as exc:                   # object arrays need pickle: refused
            raise ValueError(f"{path}: {exc}; lesde never unpickles files") from exc
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{path}: {key} must be a numeric array, got dtype {x.dtype}")
    if sp is not None:
        if sp.shape != y.shape:
            raise ValueError(f"{path}: split has shape {sp.shape}, labels {y.shape}")
        sel = _select_split(sp, split, path)
        if x.ndim not in (3, 4) or x.shape[-2] != y.shape[0]:
            raise ValueError(f"{path}: {key} has shape {x.shape}, which does not match labels "
                             f"of shape {y.shape}: expected (T, N, p) or (R, T, N, p)")
        x, y = x[..., sel, :], y[sel]
    return Trajectory(times, x, y, num_classes=K,
                      class_weights=class_weights if class_weights is not None else cw)


def _stack_runs(sources: list, **kwargs) -> Trajectory:
    """Several logged runs as the trials of one Trajectory (same times, same tracked labels)."""
    if not sources:
        raise ValueError("an empty list of runs was given")
    trajs = []
    for i, src in enumerate(sources):
        if isinstance(src, (list, np.ndarray)):
            raise ValueError(f"a list source must hold logs (stores, paths, Solutions, "
                             f"Trajectories); item {i} is a {type(src).__name__}")
        trajs.append(as_trajectory(src, **kwargs))
    first = trajs[0]
    for i, tr in enumerate(trajs[1:], start=1):
        if tr.ts.shape != first.ts.shape or not np.allclose(tr.ts, first.ts):
            raise ValueError(f"run {i} is logged at other times than run 0 (T = {tr.T} vs "
                             f"{first.T}); runs stacked as trials need the same log times")
        if not np.array_equal(tr.labels, first.labels):
            raise ValueError(f"run {i} tracks samples with other labels (or in another order) "
                             "than run 0; runs stacked as trials need the same tracked labels")
        if tr.p != first.p:
            raise ValueError(f"run {i} has p = {tr.p}, run 0 has p = {first.p}")
    return Trajectory(first.ts, np.concatenate([tr.features for tr in trajs], axis=0),
                      first.labels, num_classes=first.K,
                      class_weights=kwargs.get("class_weights"))
