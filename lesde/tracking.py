"""Train a real network and log per-sample feature and logit trajectories to a Zarr store.

The locally elastic SDE (background.md, section 2) describes how the penultimate features
``X_j(t)`` of the training samples move during SGD. To fit it (section 4) one needs, for a fixed
*tracked set* of samples, the features and logits at many training steps. This module provides:

- :class:`TrainConfig`: a small immutable specification of one training run (network, optimizer,
  batch size, length, what is logged and how often); it round-trips through JSON.
- :func:`train_and_track`: trains on cross-entropy with SGD or Adam and, every ``log_every``
  optimizer steps (and at step 0 and at the last step), records for the tracked set the
  penultimate features ``(M, p)`` and logits ``(M, K)`` (evaluation mode, no gradient), plus
  train and test loss and accuracy. Optionally, every ``impacts_every`` steps, the impact matrix
  is measured directly on the network with :func:`lesde.elasticity.measure_impacts`.
- :class:`TrajectoryStore` / :func:`load_store`: the on-disk result, a Zarr group (a directory),
  chunked along time and appended to as training runs; it carries a format version.

Time. Every logged row carries both the optimizer step index ``s`` (an integer, the number of
parameter updates made so far) and the lr-scaled time ``t = s * lr`` -- the time variable of the
SDE, in which one SGD step of learning rate ``h`` advances time by ``h``. The learning rate is
constant over a run.

Store layout (``FORMAT_VERSION`` = 1). With ``T`` logged times, ``M`` tracked samples (train
samples first, grouped by class, then test samples grouped by class), ``p`` features and ``K``
classes:

=================  ============  ===========================================================
array              shape         meaning
=================  ============  ===========================================================
``features``       (T, M, p)     penultimate features, in the training dtype
``logits``         (T, M, K)     logits, in the training dtype
``labels``         (M,)          int64 class labels of the tracked samples
``split``          (M,)          int8, 0 = train sample, 1 = test sample
``index``          (M,)          int64 row of the sample in the train or test tensor given
``step``           (T,)          int64 optimizer step of each logged row
``time``           (T,)          float64 lr-scaled time ``step * lr``
``train_loss``     (T,)          float64 mean cross-entropy on the train evaluation subset
``train_acc``      (T,)          float64 accuracy on the train evaluation subset
``test_loss``      (T,)          float64 mean cross-entropy on the test evaluation subset
``test_acc``       (T,)          float64 accuracy on the test evaluation subset
``impacts``        (T', K, K)    measured impact matrices E_hat (only if impacts_every > 0)
``impact_alpha``   (T',)         measured intra-class impact alpha_hat
``impact_beta``    (T',)         measured inter-class impact beta_hat
``impact_step``    (T',)         optimizer step of each measurement
``impact_time``    (T',)         lr-scaled time of each measurement
=================  ============  ===========================================================

Attributes: ``format_version``, ``config`` (the whole :class:`TrainConfig` as a JSON-able dict),
``class_names``, ``n_eval_train`` / ``n_eval_test`` (sizes of the metric subsets), ``complete``,
``data_fingerprint`` (SHA-256 of the train and test tensors: resuming on other data is refused).

Metrics [package choice]. Train loss and accuracy are measured on a fixed subset of the training
set chosen by the seed (``eval_train_size`` samples; it always contains the tracked train samples,
so the default ``0`` means "the tracked train samples only"; ``-1`` means the whole training set).
Test metrics likewise on ``eval_test_size`` test samples (default ``-1``: the whole test set).
The forward pass that logs the tracked samples is the same one that measures the metrics, so
logging costs one evaluation-mode forward pass over the two subsets per logged step.

Checkpoints. Every ``checkpoint_every`` steps, and at the end, the model, the optimizer, all
random states (torch, numpy, python ``random``, the data-order generator with the current
permutation and position) and the step are written to ``<store>/checkpoint.ckpt`` atomically
(a temporary file, then a rename). Calling :func:`train_and_track` again with the same config and
store resumes from that checkpoint: rows logged after the checkpoint step are dropped and logged
again, so that the store of an interrupted-and-resumed run equals that of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FORMAT_VERSION",
    "TrainConfig",
    "TrajectoryStore",
    "load_store",
    "train_and_track",
]

FORMAT_VERSION = 1
"""Version of the trajectory-store layout written by this module; readers refuse any other."""

_CHECKPOINT_NAME = "checkpoint.ckpt"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
_CHUNK_BYTES = 4 * 2**20  # target size of one time-chunk of features / logits


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Specification of one tracked training run (immutable; JSON round-trip).

    Args:
        net: network name for :func:`lesde.nets.build_net` ("resnet18", "resnet20", "lenet",
            "mlp").
        num_classes: K, the number of classes (labels must lie in ``0..K-1``).
        net_kwargs: extra keyword arguments of ``build_net`` (e.g. ``{"width": 0.25}``).
        optimizer: "sgd" (uses ``lr``, ``momentum``, ``weight_decay``) or "adam" (``lr``,
            ``weight_decay``).
        lr: learning rate h (constant); the lr-scaled time of step s is ``s * lr``.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty coefficient of the optimizer.
        batch_size: samples per optimizer step (1 allowed). With ``sampling="reshuffle"``
            each epoch is a fresh random permutation of the training set and an incomplete
            last batch is dropped.
        steps: number of optimizer steps. Exactly one of ``steps`` and ``epochs`` is positive.
        epochs: number of epochs (may be fractional); converted to
            ``ceil(epochs * (N // batch_size))`` steps.
        log_every: log the tracked set every this many steps (also at step 0 and the last step).
        track_per_class: m, tracked training samples per class (chosen by the seed).
        track_test_per_class: tracked test samples per class (0 = none).
        eval_train_size: size of the fixed train subset for train loss/accuracy; it contains the
            tracked train samples; 0 = the tracked train samples only, -1 = the whole train set.
        eval_test_size: size of the fixed test subset for test loss/accuracy; it contains the
            tracked test samples; 0 = the tracked test samples only, -1 = the whole test set.
        eval_batch_size: batch size of the evaluation-mode forward passes (memory only).
        seed: seeds the initialisation, the tracked set, the evaluation subsets and data order.
        dtype: "float32" or "float64", the dtype of the network and of the stored trajectories.
        device: torch device string ("cpu", "cuda", ...).
        checkpoint_every: write a checkpoint every this many steps (0 = only at the end).
        impacts_every: measure the impact matrix every this many steps (0 = never) with
            :func:`lesde.elasticity.measure_impacts` on the tracked train samples.
        impacts_per_class: use only the first this-many tracked train samples of each class for
            the impact measurement (0 = all ``track_per_class``).
        impacts_output: "logits" or "features", passed as ``output`` to ``measure_impacts``.
        class_names: optional names of the K classes (stored as an attribute).
        sampling: "reshuffle" (default: random reshuffling, epoch by epoch) or "replacement"
            (every step draws ``batch_size`` samples uniformly with replacement, the draw the
            LE-SDE's drift and noise average over, and the SGD of Zhang, Wang & Su's code).
    """

    net: str
    num_classes: int
    net_kwargs: dict = field(default_factory=dict)
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 64
    steps: int = 0
    epochs: float = 0.0
    log_every: int = 10
    track_per_class: int = 100
    track_test_per_class: int = 0
    eval_train_size: int = 0
    eval_test_size: int = -1
    eval_batch_size: int = 256
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    checkpoint_every: int = 0
    impacts_every: int = 0
    impacts_per_class: int = 0
    impacts_output: str = "logits"
    class_names: Optional[Tuple[str, ...]] = None
    sampling: str = "reshuffle"

    def __post_init__(self):
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
            if len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"class_names has {len(self.class_names)} names, expected num_classes = "
                    f"{self.num_classes}"
                )
        object.__setattr__(self, "net_kwargs", dict(self.net_kwargs))
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if (self.steps > 0) == (self.epochs > 0):
            raise ValueError(
                f"give exactly one of steps and epochs as a positive number "
                f"(got steps={self.steps}, epochs={self.epochs})"
            )
        if self.log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {self.log_every}")
        if self.track_per_class < 1 or self.track_test_per_class < 0:
            raise ValueError(
                "track_per_class must be >= 1 and track_test_per_class >= 0, got "
                f"{self.track_per_class} and {self.track_test_per_class}"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        for name in ("checkpoint_every", "impacts_every", "impacts_per_class"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sampling not in ("reshuffle", "replacement"):
            raise ValueError(
                f"sampling must be 'reshuffle' or 'replacement', got {self.sampling!r}"
            )
        if self.impacts_output not in ("logits", "features"):
            raise ValueError(
                f"impacts_output must be 'logits' or 'features', got {self.impacts_output!r}"
            )

    # -- JSON round trip ------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The config as a JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        if d["class_names"] is not None:
            d["class_names"] = list(d["class_names"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def total_steps(self, n_train: int) -> int:
        """Number of optimizer steps of the run for a training set of ``n_train`` samples."""
        if self.steps > 0:
            return int(self.steps)
        per_epoch = n_train // self.batch_size
        if per_epoch < 1:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the training set ({n_train})"
            )
        return int(math.ceil(self.epochs * per_epoch))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return _DTYPES[self.dtype]


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------
def _zarr():
    import zarr

    return zarr


def _create_array(group, name, shape, chunks, dtype):
    create = getattr(group, "create_array", None)
    if create is None:  # zarr 2
        return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype)
    return create(name, shape=shape, chunks=chunks, dtype=dtype)


class TrajectoryStore:
    """A trajectory store on disk (a Zarr group directory); see the module docstring for layout.

    Open one with :meth:`open` or :func:`load_store`. Arrays are read with ``store["name"]``
    (a lazy Zarr array; slice it, or use :meth:`array` for a numpy copy). The convenience
    accessors return numpy arrays.
    """

    def __init__(self, path: str, group):
        self.path = os.fspath(path)
        self.group = group

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path, mode: str = "r") -> "TrajectoryStore":
        """Open an existing store at ``path`` (``mode`` "r" or "r+").

        Raises:
            FileNotFoundError: nothing exists at ``path``.
            ValueError: ``path`` is not a lesde trajectory store, or its ``format_version``
                differs from :data:`FORMAT_VERSION` (the message gives both versions).
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no trajectory store at {path}: the path does not exist")
        zarr = _zarr()
        try:
            group = zarr.open_group(path, mode=mode)
        except Exception as exc:  # zarr raises several types for "not a group"
            raise ValueError(
                f"{path} is not a lesde trajectory store (no Zarr group there: {exc})"
            ) from None
        attrs = dict(group.attrs)
        if "format_version" not in attrs or "config" not in attrs:
            raise ValueError(
                f"{path} is not a lesde trajectory store (a Zarr group without the "
                "'format_version' and 'config' attributes)"
            )
        found = attrs["format_version"]
        if found != FORMAT_VERSION:
            raise ValueError(
                f"trajectory store {path} has format_version {found}, but this version of lesde "
                f"reads format_version {FORMAT_VERSION}; re-create it with this version"
            )
        return cls(path, group)

    @classmethod
    def _create(cls, path, config: TrainConfig, labels, split, index, feature_dim: int,
                class_names: Sequence[str], n_eval_train: int, n_eval_test: int,
                ) -> "TrajectoryStore":
        zarr = _zarr()
        group = zarr.open_group(os.fspath(path), mode="w")
        m = len(labels)
        k = config.num_classes
        item = 8 if config.dtype == "float64" else 4
        ct = int(max(1, min(1024, _CHUNK_BYTES // max(1, m * feature_dim * item))))
        ctl = int(max(1, min(1024, _CHUNK_BYTES // max(1, m * k * item))))
        _create_array(group, "features", (0, m, feature_dim), (ct, m, feature_dim), config.dtype)
        _create_array(group, "logits", (0, m, k), (ctl, m, k), config.dtype)
        for name, values, dt in (("labels", labels, "int64"), ("split", split, "int8"),
                                 ("index", index, "int64")):
            a = _create_array(group, name, (m,), (max(1, m),), dt)
            a[:] = np.asarray(values, dtype=dt)
        _create_array(group, "step", (0,), (4096,), "int64")
        for name in ("time",) + _METRICS:
            _create_array(group, name, (0,), (4096,), "float64")
        if config.impacts_every > 0:
            _create_array(group, "impacts", (0, k, k), (1024, k, k), "float64")
            _create_array(group, "impact_step", (0,), (4096,), "int64")
            for name in ("impact_time", "impact_alpha", "impact_beta"):
                _create_array(group, name, (0,), (4096,), "float64")
        from . import __version__

        group.attrs.update({
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "class_names": list(class_names),
            "n_eval_train": int(n_eval_train),
            "n_eval_test": int(n_eval_test),
            "lesde_version": __version__,
            "complete": False,
        })
        return cls(path, group)

    # -- basic access -----------------------------------------------------------------------
    def __getitem__(self, name):
        return self.group[name]

    def __len__(self) -> int:
        """T, the number of logged times."""
        return int(self.group["step"].shape[0])

    def __repr__(self) -> str:
        c = self.config
        return (f"TrajectoryStore({self.path!r}, T={len(self)}, M={self.labels.shape[0]}, "
                f"net={c.net!r}, K={c.num_classes})")

    def array(self, name: str) -> np.ndarray:
        """A numpy copy of the whole array ``name``."""
        return np.asarray(self.group[name][...])

    @property
    def config(self) -> TrainConfig:
        """The :class:`TrainConfig` of the run."""
        return TrainConfig.from_dict(dict(self.group.attrs["config"]))

    @property
    def class_names(self) -> list:
        """Names of the K classes."""
        return list(self.group.attrs["class_names"])

    @property
    def complete(self) -> bool:
        """Whether the run reached its last step."""
        return bool(self.group.attrs.get("complete", False))

    @property
    def labels(self) -> np.ndarray:
        """(M,) int64 labels of the tracked samples."""
        return self.array("labels")

    @property
    def split(self) -> np.ndarray:
        """(M,) int8: 0 for tracked train samples, 1 for tracked test samples."""
        return self.array("split")

    @property
    def index(self) -> np.ndarray:
        """(M,) int64 rows of the tracked samples in the train / test tensors."""
        return self.array("index")

    @property
    def step(self) -> np.ndarray:
        """(T,) int64 optimizer step of each logged row."""
        return self.array("step")

    @property
    def time(self) -> np.ndarray:
        """(T,) float64 lr-scaled time ``step * lr`` of each logged row."""
        return self.array("time")

    def metrics(self) -> dict:
        """Dict of (T,) numpy arrays: step, time, train_loss, train_acc, test_loss, test_acc."""
        return {name: self.array(name) for name in ("step", "time") + _METRICS}

    def impacts(self) -> dict:
        """Dict of numpy arrays: step (T',), time (T',), E (T', K, K), alpha (T',), beta (T',).

        Raises ``ValueError`` when the run did not measure impacts (``impacts_every = 0``).
        """
        if self.config.impacts_every <= 0:
            raise ValueError(f"store {self.path} has no impacts (impacts_every was 0)")
        return {"step": self.array("impact_step"), "time": self.array("impact_time"),
                "E": self.array("impacts"), "alpha": self.array("impact_alpha"),
                "beta": self.array("impact_beta")}

    def class_means(self, what: str = "logits", split: str = "train") -> np.ndarray:
        """Class-mean trajectories Xbar_k(t) of the tracked samples, shape (T, K, d).

        Args:
            what: "logits" (d = K) or "features" (d = p).
            split: "train", "test" or "all" tracked samples.
        """
        if what not in ("logits", "features"):
            raise ValueError(f"what must be 'logits' or 'features', got {what!r}")
        sel = self._select(split)
        values = np.asarray(self.group[what][...])[:, sel]
        labels = self.labels[sel]
        k = self.config.num_classes
        out = np.full((values.shape[0], k, values.shape[2]), np.nan, dtype=values.dtype)
        for c in range(k):
            if np.any(labels == c):
                out[:, c] = values[:, labels == c].mean(axis=1)
        return out

    def _select(self, split: str) -> np.ndarray:
        s = self.split
        if split == "train":
            return s == 0
        if split == "test":
            return s == 1
        if split == "all":
            return np.ones_like(s, dtype=bool)
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")

    # -- checkpoint -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str:
        """Path of the run's last checkpoint inside the store directory."""
        return os.path.join(self.path, _CHECKPOINT_NAME)

    def load_model(self, map_location: str = "cpu"):
        """The network at the last checkpoint, in evaluation mode; returns ``(model, step)``."""
        if not os.path.exists(self.checkpoint_path):
            raise FileNotFoundError(f"store {self.path} has no checkpoint")
        cfg = self.config
        state = torch.load(self.checkpoint_path, map_location=map_location, weights_only=False)
        model = _build_model(cfg, device=map_location)
        model.load_state_dict(state["model"])
        model.eval()
        return model, int(state["step"])

    # -- writing (private) ------------------------------------------------------------------
    def _append(self, rows: list) -> None:
        """Append buffered log rows (dicts) to the time arrays."""
        if not rows:
            return
        n0 = len(self)
        n1 = n0 + len(rows)
        cols = {
            "features": np.stack([r["features"] for r in rows]),
            "logits": np.stack([r["logits"] for r in rows]),
            "step": np.array([r["step"] for r in rows], dtype=np.int64),
            "time": np.array([r["time"] for r in rows], dtype=np.float64),
        }
        for name in _METRICS:
            cols[name] = np.array([r[name] for r in rows], dtype=np.float64)
        for name, values in cols.items():
            arr = self.group[name]
            arr.resize((n1,) + tuple(arr.shape[1:]))
            arr[n0:n1] = values

    def _append_impact(self, step: int, time: float, E, alpha, beta) -> None:
        n0 = int(self.group["impact_step"].shape[0])
        for name, value in (("impacts", E), ("impact_step", step), ("impact_time", time),
                            ("impact_alpha", alpha), ("impact_beta", beta)):
            arr = self.group[name]
            arr.resize((n0 + 1,) + tuple(arr.shape[1:]))
            arr[n0] = value

    def _truncate(self, last_step: int) -> None:
        """Drop every row logged after optimizer step ``last_step`` (-1 drops all rows)."""
        steps = self.step
        n = int(np.searchsorted(steps, last_step, side="right"))
        for name in ("features", "logits", "step", "time") + _METRICS:
            arr = self.group[name]
            arr.resize((n,) + tuple(arr.shape[1:]))
        if self.config.impacts_every > 0:
            isteps = self.array("impact_step")
            n = int(np.searchsorted(isteps, last_step, side="right"))
            for name in ("impacts", "impact_step", "impact_time", "impact_alpha",
                         "impact_beta"):
                arr = self.group[name]
                arr.resize((n,) + tuple(arr.shape[1:]))


def load_store(path) -> TrajectoryStore:
    """Open the trajectory store at ``path`` read-only (see :meth:`TrajectoryStore.open`)."""
    return TrajectoryStore.open(path, mode="r")


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _build_model(config: TrainConfig, device=None) -> torch.nn.Module:
    from .nets import build_net

    model = build_net(config.net, config.num_classes, **config.net_kwargs)
    return model.to(device=device or config.device, dtype=config.torch_dtype)


def _make_optimizer(config: TrainConfig, params):
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _check_data(name: str, data, num_classes: int, allow_none: bool = False):
    if data is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be an (images, labels) pair, got None")
    try:
        x, y = data
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an (images, labels) pair of tensors") from None
    x = torch.as_tensor(x)
    y = torch.as_tensor(y).long()
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: images must have shape (N, ...) and labels (N,), got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name}: labels must lie in 0..{num_classes - 1}")
    return x, y


def _choose_per_class(labels: np.ndarray, per_class: int, k: int, rng, what: str) -> np.ndarray:
    """``per_class`` random rows of each class (sorted within class), classes in order."""
    out = []
    for c in range(k):
        rows = np.flatnonzero(labels == c)
        if len(rows) < per_class:
            raise ValueError(
                f"{what}: class {c} has {len(rows)} samples, fewer than the {per_class} asked for"
            )
        out.append(np.sort(rng.choice(rows, size=per_class, replace=False)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _eval_subset(n: int, tracked: np.ndarray, size: int, rng) -> np.ndarray:
    """Tracked rows first, then extra random rows up to ``size`` (-1 = all ``n`` rows)."""
    size = n if size < 0 else min(size, n)
    if size <= len(tracked):
        return tracked.astype(np.int64)
    rest = np.setdiff1d(np.arange(n), tracked)
    extra = np.sort(rng.choice(rest, size=size - len(tracked), replace=False))
    return np.concatenate([tracked, extra]).astype(np.int64)


@torch.no_grad()
def _forward_eval(model, x, y, rows: np.ndarray, n_keep: int, batch: int, device, dtype):
    """Evaluation-mode pass over ``x[rows]``: (features, logits) of the first ``n_keep`` rows
    as numpy, and the mean cross-entropy and accuracy over all rows (nan when empty)."""
    feats, logits = [], []
    loss_sum, correct = 0.0, 0
    for a in range(0, len(rows), batch):
        idx = torch.as_tensor(rows[a:a + batch])
        xb = x[idx].to(device=device, dtype=dtype)
        yb = y[idx].to(device)
        f, z = model.forward_features(xb)
        loss_sum += float(F.cross_entropy(z, yb, reduction="sum"))
        correct += int((z.argmax(1) == yb).sum())
        if a < n_keep:
            feats.append(f[: n_keep - a].cpu())
            logits.append(z[: n_keep - a].cpu())
    n = len(rows)
    loss = loss_sum / n if n else float("nan")
    acc = correct / n if n else float("nan")
    if n_keep:
        return torch.cat(feats).numpy(), torch.cat(logits).numpy(), loss, acc
    return None, None, loss, acc


def _fingerprint(x_tr, y_tr, x_te, y_te) -> str:
    """SHA-256 of the data's sizes, labels and images (float32 bytes), to refuse resuming a
    run on other data."""
    import hashlib

    h = hashlib.sha256()
    for part in (x_tr, y_tr, x_te, y_te):
        if part is None:
            h.update(b"none")
            continue
        t = part.detach().cpu()
        t = t.float() if t.is_floating_point() else t.long()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


class _DataOrder:
    """Random reshuffling, one permutation per epoch, or uniform draws with replacement, from
    its own generator (resumable)."""

    def __init__(self, n: int, batch: int, seed: int, replacement: bool = False):
        self.n, self.batch = n, batch
        self.replacement = bool(replacement)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0
        self.epoch = 0

    def next_batch(self) -> torch.Tensor:
        if self.replacement:
            return torch.randint(self.n, (self.batch,), generator=self.gen)
        if self.pos + self.batch > self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
            self.epoch += 1
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def state(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos,
                "epoch": self.epoch}

    def load(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])


def _save_checkpoint(path: str, model, optimizer, order: _DataOrder, step: int,
                     config: TrainConfig) -> None:
    state = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "order": order.state(),
    }
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: str, model, optimizer, order: _DataOrder, config: TrainConfig,
                     device) -> int:
    state = torch.load(path, map_location=device, weights_only=False)
    if TrainConfig.from_dict(state["config"]) != config:
        raise ValueError(f"checkpoint {path} was written by a run with a different config")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    order.load(state["order"])
    return int(state["step"])


def _config_diff(a: TrainConfig, b: TrainConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: {da[k]!r} in the store vs {db[k]!r} now"
                     for k in da if da[k] != db[k])


def _measure_impacts(model, x, y, config: TrainConfig):
    from .elasticity import measure_impacts

    was_training = model.training
    model.eval()
    try:
        res = measure_impacts(model, x, y, config.lr, num_classes=config.num_classes,
                              output=config.impacts_output, keep_delta=False)
    finally:
        model.train(was_training)
    E = np.asarray(torch.as_tensor(res.E).detach().cpu(), dtype=np.float64)
    alpha = float(torch.as_tensor(res.alpha).detach().cpu())
    beta = float(torch.as_tensor(res.beta).detach().cpu())
    return E, alpha, beta


def train_and_track(
    config: TrainConfig,
    train,
    test=None,
    store=None,
    progress: bool = True,
    callback: Optional[Callable[[int, torch.nn.Module, torch.optim.Optimizer], None]] = None,
    until_step: Optional[int] = None,
) -> TrajectoryStore:
    """Train a network on cross-entropy and log the tracked set's trajectories to a store.

    The network ``build_net(config.net, K, **config.net_kwargs)`` (initialised after
    ``torch.manual_seed(config.seed)``) is trained for ``config.total_steps(N)`` optimizer
    steps of SGD or Adam at constant learning rate ``h = config.lr``. At steps
    ``s = 0, log_every, 2 log_every, ...`` and at the last step, the penultimate features
    ``(M, p)`` and logits ``(M, K)`` of the tracked samples are computed in evaluation mode without
    gradient and appended to the store with ``step = s`` and lr-scaled time ``t = s h``, together
    with the train/test loss and accuracy on the evaluation subsets (see the module docstring).

    If ``store`` already holds a run with the same config, the run resumes from its last
    checkpoint (a finished run returns at once); rows logged after that checkpoint are dropped
    first, so the result equals that of an uninterrupted run (exactly, for a deterministic run
    such as float64 on CPU with one thread).

    Args:
        config: the run's :class:`TrainConfig`.
        train: ``(images, labels)``: images a float tensor ``(N, ...)`` in the network's input
            layout (e.g. ``(N, 3, 32, 32)``), labels an integer tensor ``(N,)`` in ``0..K-1``.
        test: ``(images, labels)`` of the test set, or None (no test tracking; test metrics
            are nan).
        store: directory of the Zarr store (created if absent). Required.
        progress: show a tqdm progress bar with the running batch loss and the last logged
            accuracies.
        callback: called as ``callback(step, model, optimizer)`` after every optimizer step
            (after that step's logging and checkpoint); an exception it raises interrupts the run
            (the rows logged so far are written out first).
        until_step: stop (resumably) once this many steps have been made, without marking the
            run complete; None runs to the end.

    Returns:
        The :class:`TrajectoryStore`, opened read-only.
    """
    if store is None:
        raise ValueError("store must be the path of the trajectory store directory")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    k = config.num_classes
    train = _check_data("train", train, k)
    test = _check_data("test", test, k, allow_none=True)
    x_tr, y_tr = train
    n_train = int(y_tr.shape[0])
    total = config.total_steps(n_train)
    device = torch.device(config.device)
    dtype = config.torch_dtype
    path = os.fspath(store)

    # tracked set and evaluation subsets: fixed by the seed
    rng = np.random.default_rng(config.seed)
    y_tr_np = y_tr.numpy()
    tr_rows = _choose_per_class(y_tr_np, config.track_per_class, k, rng, "train")
    eval_tr = _eval_subset(n_train, tr_rows, config.eval_train_size, rng)
    if test is not None:
        x_te, y_te = test
        y_te_np = y_te.numpy()
        te_rows = (_choose_per_class(y_te_np, config.track_test_per_class, k, rng, "test")
                   if config.track_test_per_class else np.zeros(0, dtype=np.int64))
        eval_te = _eval_subset(len(y_te_np), te_rows, config.eval_test_size, rng)
    else:
        if config.track_test_per_class:
            raise ValueError("track_test_per_class > 0 needs a test set")
        x_te = y_te = None
        te_rows = np.zeros(0, dtype=np.int64)
        eval_te = te_rows

    # model, optimizer, data order (the seed fixes the initialisation)
    torch.manual_seed(config.seed)
    model = _build_model(config)
    optimizer = _make_optimizer(config, model.parameters())
    order = _DataOrder(n_train, config.batch_size, config.seed + 1,
                       replacement=config.sampling == "replacement")

    # the store: create, or resume
    fingerprint = _fingerprint(x_tr, y_tr, x_te, y_te)
    start = 0
    ts = None
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        ts = TrajectoryStore.open(path, mode="r+")
        if ts.config != config:
            raise ValueError(
                f"store {path} holds a run with a different config ({_config_diff(ts.config, config)}); "
                "use another store path"
            )
        ckpt = ts.checkpoint_path
        if os.path.exists(ckpt):
            start = _load_checkpoint(ckpt, model, optimizer, order, config, device)
        found = ts.group.attrs.get("data_fingerprint")
        if found != fingerprint:
            raise ValueError(
                f"store {path} was made from other training/test data (fingerprint "
                f"{str(found)[:12]}..., these data {fingerprint[:12]}...); use another store path"
            )
        ts._truncate(start if os.path.exists(ckpt) else -1)
        ts.group.attrs["complete"] = False
    if ts is None:
        labels = np.concatenate([y_tr_np[tr_rows], y_te_np[te_rows] if test is not None
                                 else np.zeros(0, dtype=np.int64)])
        split = np.concatenate([np.zeros(len(tr_rows), np.int8), np.ones(len(te_rows), np.int8)])
        index = np.concatenate([tr_rows, te_rows])
        with torch.no_grad():
            model.eval()
            probe = x_tr[:1].to(device=device, dtype=dtype)
            feature_dim = int(model.forward_features(probe)[0].shape[1])
        names = config.class_names or tuple(str(c) for c in range(k))
        ts = TrajectoryStore._create(path, config, labels, split, index, feature_dim, names,
                                     len(eval_tr), len(eval_te))
        ts.group.attrs["data_fingerprint"] = fingerprint

    x_tr_dev = x_tr.to(device=device, dtype=dtype)
    y_tr_dev = y_tr.to(device)
    if config.impacts_every > 0:
        per = config.impacts_per_class or config.track_per_class
        per = min(per, config.track_per_class)
        imp_rows = np.concatenate([tr_rows[c * config.track_per_class:
                                           c * config.track_per_class + per] for c in range(k)])
        imp_idx = torch.as_tensor(imp_rows)
        x_imp, y_imp = x_tr_dev[imp_idx], y_tr_dev[imp_idx]

    buffer = []
    flush_rows = int(ts["features"].chunks[0])
    last = {"train_acc": float("nan"), "test_acc": float("nan")}

    def log(step):
        model.eval()
        f_tr, z_tr, tl, ta = _forward_eval(model, x_tr_dev, y_tr_dev, eval_tr, len(tr_rows),
                                           config.eval_batch_size, device, dtype)
        if test is not None:
            f_te, z_te, vl, va = _forward_eval(model, x_te, y_te, eval_te, len(te_rows),
                                               config.eval_batch_size, device, dtype)
        else:
            f_te = z_te = None
            vl = va = float("nan")
        model.train()
        feats = f_tr if f_te is None else np.concatenate([f_tr, f_te])
        logits = z_tr if z_te is None else np.concatenate([z_tr, z_te])
        buffer.append({"features": feats, "logits": logits, "step": step,
                       "time": step * config.lr, "train_loss": tl, "train_acc": ta,
                       "test_loss": vl, "test_acc": va})
        last.update(train_acc=ta, test_acc=va)
        if len(buffer) >= flush_rows:
            flush()

    def flush():
        ts._append(buffer)
        buffer.clear()

    def is_log_step(s):
        return s % config.log_every == 0 or s == total

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, disable=not progress, desc="train", unit="step",
               dynamic_ncols=True)
    ema = None
    stop = total if until_step is None else min(total, int(until_step))
    model.train()
    try:
        if start == 0 and len(ts) == 0:
            log(0)
            if config.impacts_every > 0:
                ts._append_impact(0, 0.0, *_measure_impacts(model, x_imp, y_imp, config))
        step = start
        while step < stop:
            idx = order.next_batch()
            xb = x_tr_dev[idx.to(device)]
            yb = y_tr_dev[idx.to(device)]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            step += 1
            lv = float(loss.detach())
            ema = lv if ema is None else 0.98 * ema + 0.02 * lv
            if is_log_step(step):
                log(step)
            if config.impacts_every > 0 and (step % config.impacts_every == 0):
                ts._append_impact(step, step * config.lr,
                                  *_measure_impacts(model, x_imp, y_imp, config))
            if step == total or (config.checkpoint_every and step % config.checkpoint_every == 0):
                flush()
                _save_checkpoint(ts.checkpoint_path, model, optimizer, order, step, config)
            bar.update(1)
            if progress:
                bar.set_postfix(loss=f"{ema:.3f}", train_acc=f"{last['train_acc']:.3f}",
                                test_acc=f"{last['test_acc']:.3f}", refresh=False)
            if callback is not None:
                callback(step, model, optimizer)
        if step == total:
            ts.group.attrs["complete"] = True
    finally:
        flush()
        bar.close()
    return TrajectoryStore.open(path, mode="r")
