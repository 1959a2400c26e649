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

Shared stores are untrusted [package choice]. A checkpoint holds only tensors, numbers, strings
and plain containers (random states as integer tensors) and is read with
``torch.load(weights_only=True)``: a crafted checkpoint whose pickle would run code is refused
(:class:`lesde.storage.UnsafeFileError`) before anything in it runs. Store attributes are JSON;
every array must have its documented numeric dtype and plain compression codecs (a codec such as
``pickle`` is refused before data are read). Zarr reads a missing chunk as zeros, so every chunk
is written (empty ones too) and :func:`load_store` refuses a store with a missing chunk
(:class:`StoreDamagedError`, naming the array and its rows and steps).

One writer per store: :func:`train_and_track` holds ``<store>/lesde.lock`` (pid, host and an
advisory ``flock``) while it writes; a second writer gets
:class:`lesde.storage.DirectoryLockedError`, a lock left by a killed writer on this host is taken
over with a warning. A store is created with a marker attribute that is replaced, in one atomic
write, by its config and data fingerprint: a creation interrupted in between is recognised
(:class:`PartialStoreError`) and recreated by the next run.
"""
from __future__ import annotations

import dataclasses
import itertools
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
    "PartialStoreError",
    "StoreDamagedError",
    "TrainingDivergedError",
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


def _as_int(name: str, value) -> int:
    """An integer field (numpy integers and integral floats accepted), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not (math.isfinite(value) and int(value) == value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_float(name: str, value) -> float:
    """A finite real field, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)



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
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 (frozen)
        if not isinstance(self.net, str) or not self.net:
            raise ValueError(f"net must be a network name, got {self.net!r}")
        from .nets import NETS

        if self.net.lower() not in NETS:
            raise ValueError(f"net: unknown network {self.net!r}; known: {', '.join(sorted(NETS))}")
        for name in ("num_classes", "batch_size", "steps", "log_every", "track_per_class",
                     "track_test_per_class", "eval_train_size", "eval_test_size",
                     "eval_batch_size", "seed", "checkpoint_every", "impacts_every",
                     "impacts_per_class"):
            set_(name, _as_int(name, getattr(self, name)))
        for name in ("lr", "momentum", "weight_decay", "epochs"):
            set_(name, _as_float(name, getattr(self, name)))
        if self.class_names is not None:
            if isinstance(self.class_names, str):
                raise ValueError(f"class_names must be a sequence of names, got {self.class_names!r}")
            set_("class_names", tuple(str(c) for c in self.class_names))
            if len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"class_names has {len(self.class_names)} names, expected num_classes = "
                    f"{self.num_classes}"
                )
        if not isinstance(self.net_kwargs, dict) or not all(isinstance(k, str) for k in self.net_kwargs):
            raise ValueError(f"net_kwargs must be a dict of keyword arguments, got {self.net_kwargs!r}")
        set_("net_kwargs", dict(self.net_kwargs))
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {self.momentum} and "
                             f"{self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.steps < 0 or self.epochs < 0:
            raise ValueError(f"steps and epochs must be >= 0 (give one of them as a positive "
                             f"number), got steps={self.steps}, epochs={self.epochs}")
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
        if self.eval_train_size < -1 or self.eval_test_size < -1:
            raise ValueError("eval_train_size and eval_test_size must be >= -1 (-1: all), got "
                             f"{self.eval_train_size} and {self.eval_test_size}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a device name such as 'cpu' or 'cuda', got {self.device!r}")
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
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ValueError(f"TrainConfig fields missing: {', '.join(missing)}")
        return cls(**d)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        """Inverse of :meth:`to_json`."""
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a valid TrainConfig JSON text ({exc})") from None
        if not isinstance(d, dict):
            raise ValueError(f"a TrainConfig JSON text is an object, got {type(d).__name__}")
        return cls.from_dict(d)

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


def _writing():
    """Zarr configuration for writes: every chunk is written, also one equal to the fill
    value, so that a missing chunk file always means damage (see TrajectoryStore.verify)."""
    return _zarr().config.set({"array.write_empty_chunks": True})


class StoreDamagedError(ValueError):
    """A trajectory store's data are incomplete (a chunk file is missing) or unreadable."""


class PartialStoreError(ValueError):
    """A trajectory store whose creation was interrupted (it holds no logged data)."""


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss, logits or features; the run was stopped."""


# every array of the layout: its dtype ("train" = the run's dtype) and whether it grows in time
_LAYOUT = {
    "features": ("train", True), "logits": ("train", True), "labels": ("int64", False),
    "split": ("int8", False), "index": ("int64", False), "step": ("int64", True),
    "time": ("float64", True), "train_loss": ("float64", True), "train_acc": ("float64", True),
    "test_loss": ("float64", True), "test_acc": ("float64", True),
}
_IMPACT_LAYOUT = {
    "impacts": ("float64", True), "impact_step": ("int64", True), "impact_time": ("float64", True),
    "impact_alpha": ("float64", True), "impact_beta": ("float64", True),
}
# codecs that decode bytes to numbers and nothing else (Zarr v3 names, Zarr v2 ids)
_SAFE_CODECS = {"bytes", "endian", "zstd", "blosc", "gzip", "zlib", "lz4", "bz2", "lzma",
                "crc32c", "transpose", "sharding_indexed", "shuffle", "delta"}
_MARKER_FILES = ("zarr.json", ".zgroup", ".zattrs")


def _array_metadata(path: str, name: str):
    """The raw metadata (a dict) of array ``name`` in the store directory, or None."""
    for meta in ("zarr.json", ".zarray"):
        f = os.path.join(path, name, meta)
        if os.path.exists(f):
            try:
                with open(f) as fh:
                    return json.load(fh)
            except (OSError, ValueError) as exc:
                raise StoreDamagedError(f"trajectory store {path}: the metadata of array "
                                        f"{name!r} ({f}) is unreadable ({exc})") from None
    return None


def _codec_names(meta: dict) -> list:
    names = []

    def walk(codecs):
        for c in codecs or []:
            if isinstance(c, dict):
                names.append(str(c.get("name", c.get("id"))))
                walk((c.get("configuration") or {}).get("codecs"))
                walk((c.get("configuration") or {}).get("index_codecs"))
            else:
                names.append(str(c))

    walk(meta.get("codecs"))
    walk(meta.get("filters"))
    comp = meta.get("compressor")
    if comp:
        walk([comp])
    return names


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
    def open(cls, path, mode: str = "r", verify: bool = True) -> "TrajectoryStore":
        """Open an existing store at ``path`` (``mode`` "r" or "r+").

        Nothing in the store is unpickled: its attributes are JSON, and every array must be of
        its documented numeric dtype with plain compression codecs (a store naming another
        codec, e.g. ``pickle``, is refused before any data are read). With ``verify`` (the
        default) every chunk of every array must be present (:meth:`verify`).

        Raises:
            FileNotFoundError: nothing exists at ``path``.
            PartialStoreError: the store's creation was interrupted (it holds no data).
            StoreDamagedError: a chunk file is missing, or an array's metadata is unreadable.
            UnsafeFileError: an array uses a codec that is not plain numeric compression.
            ValueError: ``path`` is not a lesde trajectory store, or its ``format_version``
                differs from :data:`FORMAT_VERSION` (the message gives both versions).
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no trajectory store at {path}: the path does not exist")
        if not os.path.isdir(path):
            raise ValueError(f"{path} is not a lesde trajectory store (not a directory)")
        zarr = _zarr()
        has_group = any(os.path.exists(os.path.join(path, m)) for m in _MARKER_FILES)
        try:
            group = zarr.open_group(path, mode=mode) if has_group else None
        except Exception as exc:  # zarr raises several types for "not a group"
            raise ValueError(
                f"{path} is not a lesde trajectory store (no readable Zarr group there: {exc})"
            ) from None
        attrs = dict(group.attrs) if group is not None else {}
        lesde_parts = [n for n in ("features", "logits", "step", _CHECKPOINT_NAME)
                       if os.path.exists(os.path.join(path, n))]
        if attrs.get("lesde_creating") or (lesde_parts and (
                "config" not in attrs or "data_fingerprint" not in attrs)):
            raise PartialStoreError(
                f"{path} is a partly created trajectory store: its creation was interrupted "
                "before any training step was logged, so it holds no data. Run the same training "
                "command again (it recreates a partly created store), or delete the directory")
        if group is None or "format_version" not in attrs or "config" not in attrs:
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
        store = cls(path, group)
        try:
            config = store.config
        except (ValueError, TypeError) as exc:
            raise ValueError(f"trajectory store {path} has an invalid config attribute ({exc})") from None
        layout = dict(_LAYOUT)
        if config.impacts_every > 0:
            layout.update(_IMPACT_LAYOUT)
        for name, (dtype, _) in layout.items():
            store._check_array(name, config.dtype if dtype == "train" else dtype)
        if verify:
            store.verify()
        return store

    def _check_array(self, name: str, dtype: str) -> None:
        """Array ``name`` exists with ``dtype`` and codecs that only decode numbers."""
        from .storage import UnsafeFileError

        meta = _array_metadata(self.path, name)
        if meta is None:
            raise StoreDamagedError(f"trajectory store {self.path} lacks the array {name!r}")
        unsafe = [c for c in _codec_names(meta) if c not in _SAFE_CODECS]
        if unsafe:
            raise UnsafeFileError(
                f"trajectory store {self.path}: array {name!r} uses the codec(s) {unsafe}, which "
                "lesde does not read (only plain numeric compression: a codec such as pickle "
                "could run code); nothing was read")
        found = np.dtype(self.group[name].dtype)
        if found != np.dtype(dtype):
            raise ValueError(f"trajectory store {self.path}: array {name!r} has dtype {found}, "
                             f"expected {dtype}")

    def verify(self, upto: Optional[int] = None) -> None:
        """Check that every chunk of every array is present on disk.

        Zarr returns the fill value (zeros) for a chunk that was never written, so a store with
        a deleted or lost chunk file would otherwise read as zeros. Every chunk lesde writes
        exists (empty chunks included), so a missing one means damage. ``upto``: check only the
        time rows ``0..upto-1`` of the time arrays.

        Raises:
            StoreDamagedError: naming the store, the array and the rows (and their steps) whose
                chunk is missing.
        """
        layout = dict(_LAYOUT)
        if self.config.impacts_every > 0:
            layout.update(_IMPACT_LAYOUT)
        # stores written before every chunk was kept may lack chunks that were all zeros;
        # features and logits never are
        names = list(layout) if self.group.attrs.get("all_chunks_written") else ["features", "logits"]
        rows = {"step": len(self) if upto is None else min(len(self), int(upto))}
        if "impact_step" in layout:
            rows["impact_step"] = int(self.group["impact_step"].shape[0])
        for name in names:
            arr = self.group[name]
            shape = tuple(arr.shape)
            if layout[name][1]:
                want = rows["impact_step" if name.startswith("impact") else "step"]
                if shape[0] < want:
                    raise StoreDamagedError(
                        f"trajectory store {self.path} is damaged: array {name!r} has {shape[0]} "
                        f"rows, fewer than the {want} logged times")
                shape = (want,) + shape[1:]
            chunks = tuple(arr.chunks)
            grid = [range(math.ceil(n / c)) for n, c in zip(shape, chunks)]
            meta = getattr(arr, "metadata", None)
            for coords in itertools.product(*grid):
                key = meta.encode_chunk_key(coords) if hasattr(meta, "encode_chunk_key") else \
                    ".".join(str(c) for c in coords)
                if not os.path.exists(os.path.join(self.path, name, *key.split("/"))):
                    raise StoreDamagedError(self._missing_message(name, coords, chunks, shape))

    def _missing_message(self, name, coords, chunks, shape) -> str:
        in_time = {**_LAYOUT, **_IMPACT_LAYOUT}[name][1]
        where = f"chunk {tuple(int(c) for c in coords)}"
        if in_time:
            a = int(coords[0]) * int(chunks[0])
            b = min(shape[0], a + int(chunks[0])) - 1
            where = f"rows {a}-{b}"
            step_name = "impact_step" if name.startswith("impact") else "step"
            if name != step_name:
                try:
                    steps = np.asarray(self.group[step_name][a:b + 1])
                    if steps.size:
                        where += f" (optimizer steps {int(steps[0])}-{int(steps[-1])})"
                except Exception:  # the step array may be damaged too
                    pass
        return (f"trajectory store {self.path} is damaged: array {name!r} has no data for {where} "
                "(its chunk file is missing; Zarr would silently read zeros there). Restore the "
                "file, or train again into a new store")

    @classmethod
    def _create(cls, path, config: TrainConfig, labels, split, index, feature_dim: int,
                class_names: Sequence[str], n_eval_train: int, n_eval_test: int,
                data_fingerprint: str) -> "TrajectoryStore":
        with _writing():
            return cls._create_arrays(path, config, labels, split, index, feature_dim,
                                      class_names, n_eval_train, n_eval_test, data_fingerprint)

    @classmethod
    def _create_arrays(cls, path, config, labels, split, index, feature_dim, class_names,
                       n_eval_train, n_eval_test, data_fingerprint) -> "TrajectoryStore":
        zarr = _zarr()
        # the group is created with a marker first and receives its real attributes (config,
        # fingerprint) in one atomic write at the end: a creation interrupted in between is
        # recognised as such (PartialStoreError), never mistaken for a store of other data
        group = zarr.open_group(os.fspath(path), mode="a",
                                attributes={"lesde_creating": True, "format_version": FORMAT_VERSION})
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

        group.attrs.put({
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "class_names": list(class_names),
            "n_eval_train": int(n_eval_train),
            "n_eval_test": int(n_eval_test),
            "lesde_version": __version__,
            "complete": False,
            "data_fingerprint": data_fingerprint,
            "all_chunks_written": True,
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
        """A numpy copy of the array ``name`` (time arrays: the ``len(self)`` complete rows)."""
        arr = self.group[name]
        if name in _LAYOUT and _LAYOUT[name][1]:
            return np.asarray(arr[: len(self)])
        if name in _IMPACT_LAYOUT:
            return np.asarray(arr[: int(self.group["impact_step"].shape[0])])
        return np.asarray(arr[...])

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
        values = self.array(what)[:, sel]
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
        """The network at the last checkpoint, in evaluation mode; returns ``(model, step)``.

        The checkpoint is read with ``torch.load(weights_only=True)``: a file holding anything
        but tensors, numbers, strings and plain containers (e.g. a crafted pickle that would run
        a command) is refused with :class:`lesde.storage.UnsafeFileError` before any of it runs.
        """
        if not os.path.exists(self.checkpoint_path):
            raise FileNotFoundError(f"store {self.path} has no checkpoint")
        cfg = self.config
        state = _read_checkpoint(self.checkpoint_path, map_location)
        model = _build_model(cfg, device=map_location)
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint {self.checkpoint_path} does not fit the store's network "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
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
        with _writing():
            # the step array goes last: its length is the number of complete rows
            for name in [c for c in cols if c != "step"] + ["step"]:
                values = cols[name]
                arr = self.group[name]
                arr.resize((n1,) + tuple(arr.shape[1:]))
                arr[n0:n1] = values

    def _append_impact(self, step: int, time: float, E, alpha, beta) -> None:
        n0 = int(self.group["impact_step"].shape[0])
        with _writing():
            for name, value in (("impacts", E), ("impact_time", time), ("impact_alpha", alpha),
                                ("impact_beta", beta), ("impact_step", step)):
                arr = self.group[name]
                arr.resize((n0 + 1,) + tuple(arr.shape[1:]))
                arr[n0] = value

    def _valid_rows(self, step_name: str) -> int:
        """Rows of the time arrays that an interrupted append certainly finished: the leading
        rows whose step chunk exists and whose steps increase strictly (the step array is
        written last, so every other array is complete up to there)."""
        arr = self.group[step_name]
        n = int(arr.shape[0])
        if n == 0:
            return 0
        c = int(arr.chunks[0])
        meta = getattr(arr, "metadata", None)
        for i in range(math.ceil(n / c)):
            key = meta.encode_chunk_key((i,)) if hasattr(meta, "encode_chunk_key") else str(i)
            if not os.path.exists(os.path.join(self.path, step_name, *key.split("/"))):
                n = i * c
                break
        steps = np.asarray(arr[:n])
        bad = np.flatnonzero(np.diff(steps) <= 0)
        return int(bad[0] + 1) if bad.size else n

    def _truncate(self, last_step: int) -> None:
        """Drop every row logged after optimizer step ``last_step`` (-1 drops all rows), and
        any row an interrupted append left unfinished."""
        groups = [(("features", "logits", "time") + _METRICS + ("step",), "step")]
        if self.config.impacts_every > 0:
            groups.append((("impacts", "impact_time", "impact_alpha", "impact_beta",
                            "impact_step"), "impact_step"))
        for names, step_name in groups:
            n_ok = self._valid_rows(step_name)
            steps = np.asarray(self.group[step_name][:n_ok])
            n = int(np.searchsorted(steps, last_step, side="right"))
            with _writing():
                for name in names:
                    arr = self.group[name]
                    if arr.shape[0] < n:
                        raise StoreDamagedError(
                            f"trajectory store {self.path} is damaged: array {name!r} has "
                            f"{arr.shape[0]} rows, fewer than the {n} logged steps")
                    arr.resize((n,) + tuple(arr.shape[1:]))


def load_store(path) -> TrajectoryStore:
    """Open the trajectory store at ``path`` read-only (see :meth:`TrajectoryStore.open`)."""
    return TrajectoryStore.open(path, mode="r")


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _build_model(config: TrainConfig, device=None) -> torch.nn.Module:
    from .nets import build_net

    try:
        model = build_net(config.net, config.num_classes, **config.net_kwargs)
    except TypeError as exc:  # an unknown or missing keyword argument
        raise ValueError(f"net_kwargs {config.net_kwargs} do not fit network {config.net!r}: "
                         f"{exc}") from None
    except ValueError as exc:
        raise ValueError(f"network {config.net!r} with net_kwargs {config.net_kwargs}: {exc}") from None
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
    try:
        x = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name}: images must be a numeric array or tensor ({exc})") from None
    try:
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: labels must be integer class indices 0..{num_classes - 1}, "
                         f"got {np.asarray(y).dtype} values") from None
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name}: images must be real numbers, got dtype {x.dtype}")
    if y.is_floating_point():
        if y.numel() and not bool(torch.all(torch.isfinite(y) & (y == torch.round(y)))):
            raise ValueError(f"{name}: labels must be integer class indices 0..{num_classes - 1}")
    elif y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{name}: labels must be integer class indices, got dtype {y.dtype}")
    y = y.long()
    if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: images must have shape (N, ...) and labels (N,), got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if y.numel() == 0:
        raise ValueError(f"{name}: no samples")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"{name}: labels must lie in 0..{num_classes - 1}, found "
                         f"{int(y.min())}..{int(y.max())}")
    if x.is_floating_point():
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten()
            raise ValueError(f"{name}: {rows.numel()} image(s) contain NaN or inf values (first "
                             f"at row {int(rows[0])}); training on them would only produce NaN")
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


_CHECKPOINT_FORMAT = 2  # 2: tensors and plain containers only (read with weights_only=True)


def _save_checkpoint(path: str, model, optimizer, order: _DataOrder, step: int,
                     config: TrainConfig) -> None:
    """Write the checkpoint atomically. Everything in it is a tensor, a number, a string or a
    plain container, so it is read back with ``torch.load(weights_only=True)``."""
    from .storage import atomic_write

    name, key, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {
        "checkpoint_format": _CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": {"name": str(name), "key": torch.from_numpy(np.asarray(key, np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python_rng": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                       "gauss_next": None if gauss_next is None else float(gauss_next)},
        "order": order.state(),
    }
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def _read_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint's dict, read without running code (see lesde.storage.safe_torch_load)."""
    from .storage import safe_torch_load

    state = safe_torch_load(path, map_location=map_location, what="checkpoint")
    need = ("config", "step", "model", "optimizer", "torch_rng", "numpy_rng", "python_rng", "order")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise ValueError(f"checkpoint {path} is not a lesde training checkpoint (expected a dict "
                         f"with {', '.join(need)})")
    return state


def _restore_numpy_rng(s) -> None:
    if isinstance(s, dict):  # checkpoint_format 2
        np.random.set_state((s["name"], np.asarray(s["key"].cpu().numpy(), dtype=np.uint32),
                             int(s["pos"]), int(s["has_gauss"]), float(s["cached"])))
    else:  # earlier checkpoints: the tuple of np.random.get_state()
        np.random.set_state(tuple(s))


def _restore_python_rng(s) -> None:
    if isinstance(s, dict):
        random.setstate((int(s["version"]), tuple(int(v) for v in s["state"].tolist()),
                         s["gauss_next"]))
    else:
        random.setstate((s[0], tuple(s[1]), s[2]))


def _load_checkpoint(path: str, model, optimizer, order: _DataOrder, config: TrainConfig,
                     device) -> int:
    state = _read_checkpoint(path, map_location=device)
    try:
        same = TrainConfig.from_dict(state["config"]) == config
    except (ValueError, TypeError) as exc:
        raise ValueError(f"checkpoint {path} holds an invalid config ({exc})") from None
    if not same:
        raise ValueError(f"checkpoint {path} was written by a run with a different config")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        _restore_numpy_rng(state["numpy_rng"])
        _restore_python_rng(state["python_rng"])
        order.load(state["order"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ValueError(f"checkpoint {path} is inconsistent with its run "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                         ) from None
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

    Safety: everything that can be checked is checked before any work (the config, the data --
    shapes, labels, finite images --, a batch larger than the training set, the network's
    arguments and its fit to the images, the device, the store path, and the memory the run
    needs, :func:`training_bytes`). One process writes a store at a time: a second gets
    :class:`lesde.storage.DirectoryLockedError`; a lock left by a killed run on this host is
    taken over with a warning. A non-finite loss, logit or feature stops the run with
    :class:`TrainingDivergedError` naming the step; the last good checkpoint is kept. A
    checkpoint that is not plain tensors (e.g. a crafted pickle) is refused before any of it
    runs. A store whose creation was interrupted is recreated.

    Returns:
        The :class:`TrajectoryStore`, opened read-only.
    """
    if store is None:
        raise ValueError("store must be the path of the trajectory store directory")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if until_step is not None and (isinstance(until_step, bool) or int(until_step) != until_step
                                   or until_step < 0):
        raise ValueError(f"until_step must be a non-negative integer or None, got {until_step!r}")
    k = config.num_classes
    train = _check_data("train", train, k)
    test = _check_data("test", test, k, allow_none=True)
    x_tr, y_tr = train
    n_train = int(y_tr.shape[0])
    if config.batch_size > n_train:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set "
                         f"({n_train} samples)")
    total = config.total_steps(n_train)
    from .resources import check_device

    device = check_device(config.device, "device")
    dtype = config.torch_dtype
    path = os.fspath(store)
    x_te, y_te = test if test is not None else (None, None)
    fingerprint = _fingerprint(x_tr, y_tr, x_te, y_te)

    # a finished run returns at once, writing nothing (its store may be read-only)
    done = _finished_store(path, config, fingerprint)
    if done is not None:
        return done

    # tracked set and evaluation subsets: fixed by the seed
    rng = np.random.default_rng(config.seed)
    y_tr_np = y_tr.numpy()
    tr_rows = _choose_per_class(y_tr_np, config.track_per_class, k, rng, "train")
    eval_tr = _eval_subset(n_train, tr_rows, config.eval_train_size, rng)
    if test is not None:
        y_te_np = y_te.numpy()
        te_rows = (_choose_per_class(y_te_np, config.track_test_per_class, k, rng, "test")
                   if config.track_test_per_class else np.zeros(0, dtype=np.int64))
        eval_te = _eval_subset(len(y_te_np), te_rows, config.eval_test_size, rng)
    else:
        if config.track_test_per_class:
            raise ValueError("track_test_per_class > 0 needs a test set")
        te_rows = np.zeros(0, dtype=np.int64)
        eval_te = te_rows

    # model, optimizer, data order (the seed fixes the initialisation)
    torch.manual_seed(config.seed)
    model = _build_model(config)
    feature_dim, act_per_sample = _probe(model, config, x_tr, device, dtype)
    optimizer = _make_optimizer(config, model.parameters())
    order = _DataOrder(n_train, config.batch_size, config.seed + 1,
                       replacement=config.sampling == "replacement")
    _check_training_memory(model, config, x_tr, act_per_sample, device)

    # the store: create, or resume -- under the store's lock
    from .storage import DirectoryLock, check_output_path, remove_stale_temporaries

    check_output_path(path, "trajectory store", directory=True)
    if os.path.exists(path) and not _is_lesde_dir(path):
        raise ValueError(f"{path} exists and is not a lesde trajectory store (it holds other "
                         "files); use another store path")
    os.makedirs(path, exist_ok=True)
    lock = DirectoryLock(path, "trajectory store").acquire()
    try:
        done = _finished_store(path, config, fingerprint)  # finished while we waited
        if done is not None:
            return done
        remove_stale_temporaries(path, recursive=True)
        start = 0
        ts = None
        try:
            ts = TrajectoryStore.open(path, mode="r+", verify=False)
        except PartialStoreError:
            import warnings

            warnings.warn(f"trajectory store {path} was only partly created by an interrupted run "
                          "(no data); creating it again", RuntimeWarning, stacklevel=2)
            _wipe_store(path)
        except (FileNotFoundError, ValueError):
            if _has_group(path):
                raise
        if ts is not None:
            _check_same_run(ts, config, fingerprint)
            ckpt = ts.checkpoint_path
            if os.path.exists(ckpt):
                start = _load_checkpoint(ckpt, model, optimizer, order, config, device)
            ts._truncate(start if os.path.exists(ckpt) else -1)
            ts.verify()  # every row kept must be intact
            ts.group.attrs["complete"] = False
        else:
            labels = np.concatenate([y_tr_np[tr_rows], y_te_np[te_rows] if test is not None
                                     else np.zeros(0, dtype=np.int64)])
            split = np.concatenate([np.zeros(len(tr_rows), np.int8),
                                    np.ones(len(te_rows), np.int8)])
            index = np.concatenate([tr_rows, te_rows])
            names = config.class_names or tuple(str(c) for c in range(k))
            ts = TrajectoryStore._create(path, config, labels, split, index, feature_dim, names,
                                         len(eval_tr), len(eval_te), fingerprint)
        return _train_loop(config, ts, model, optimizer, order, start, total, until_step,
                           x_tr, y_tr, test, tr_rows, te_rows, eval_tr, eval_te, device, dtype,
                           progress, callback, path)
    finally:
        lock.release()


def _is_lesde_dir(path: str) -> bool:
    """An empty directory, or one holding (a part of) a lesde trajectory store."""
    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    return not names or bool(names & {"zarr.json", ".zgroup", _CHECKPOINT_NAME, "features",
                                      "logits", "lesde.lock"})


def _has_group(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, m)) for m in _MARKER_FILES)


def _wipe_store(path: str) -> None:
    """Remove the contents of a partly created store, keeping its lock file."""
    import shutil

    from .storage import LOCK_NAME

    for name in os.listdir(path):
        if name == LOCK_NAME:
            continue
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)


def _check_same_run(ts: "TrajectoryStore", config: TrainConfig, fingerprint: str) -> None:
    if ts.config != config:
        raise ValueError(
            f"store {ts.path} holds a run with a different config "
            f"({_config_diff(ts.config, config)}); use another store path")
    found = ts.group.attrs.get("data_fingerprint")
    if found != fingerprint:
        raise ValueError(
            f"store {ts.path} was made from other training/test data (fingerprint "
            f"{str(found)[:12]}..., these data {fingerprint[:12]}...); use another store path")


def _finished_store(path: str, config: TrainConfig, fingerprint: str):
    """The store at ``path`` opened read-only if it holds this run, finished; else None.
    A store of another run is an error; a partly created one is left to the writer."""
    if not (os.path.isdir(path) and _has_group(path)):
        return None
    try:
        ro = TrajectoryStore.open(path, mode="r", verify=False)
    except PartialStoreError:
        return None
    _check_same_run(ro, config, fingerprint)
    if not ro.complete:
        return None
    ro.verify()
    return ro


def _probe(model, config: TrainConfig, x_tr, device, dtype):
    """One evaluation-mode forward pass of one training image: the feature dimension, and the
    number of activation values per sample (for the memory estimate). A network that cannot
    take the images is an error here, before anything is written."""
    sizes = []

    def hook(_module, _inp, out):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sizes.append(sum(int(o.numel()) for o in outs if isinstance(o, torch.Tensor)))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if not list(m.children())]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            probe = x_tr[:1].to(device=device, dtype=dtype)
            feats, logits = model.forward_features(probe)
    except (RuntimeError, ValueError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"network {config.net!r} (net_kwargs {config.net_kwargs}) cannot take "
                         f"training images of shape {tuple(x_tr.shape[1:])}: {msg}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if feats.ndim != 2 or logits.shape != (1, config.num_classes):
        raise ValueError(f"network {config.net!r} gives features {tuple(feats.shape)} and logits "
                         f"{tuple(logits.shape)} for one image; expected (1, p) and "
                         f"(1, {config.num_classes})")
    return int(feats.shape[1]), int(sum(sizes) + x_tr[0].numel())


def training_bytes(n_params: int, config: TrainConfig, n_train: int, sample_numel: int,
                   act_per_sample: int, data_copied: bool) -> int:
    """Peak memory (bytes, an estimate erring high) of a training run: parameters, gradients
    and optimizer state, the training images on the device (when they are copied there or
    converted), and activations of a training batch (kept for the backward pass) and of an
    evaluation batch."""
    item = 8 if config.dtype == "float64" else 4
    opt = 2 if config.optimizer == "adam" else (1 if config.momentum > 0 else 0)
    params = n_params * item * (3 + opt)  # weights, gradients, optimizer, checkpoint copy
    data = n_train * sample_numel * item if data_copied else 0
    acts = act_per_sample * item * (4 * config.batch_size + 2 * config.eval_batch_size)
    return int(params + data + acts + 64 * 2**20)


def _check_training_memory(model, config, x_tr, act_per_sample, device) -> None:
    from .resources import check_memory

    n_params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    copied = (x_tr.dtype != config.torch_dtype) or (x_tr.device != device)
    need = training_bytes(n_params, config, int(x_tr.shape[0]), int(x_tr[0].numel()),
                          act_per_sample, copied)
    check_memory(need, f"training {config.net!r} ({n_params} parameters, batch "
                 f"{config.batch_size}, {x_tr.shape[0]} training images)",
                 "use a smaller batch_size (--batch-size), eval_batch_size, a narrower network "
                 "(--width), fewer training images (--per-class), or float32", device=device)


def _train_loop(config, ts, model, optimizer, order, start, total, until_step, x_tr, y_tr,
                test, tr_rows, te_rows, eval_tr, eval_te, device, dtype, progress, callback,
                path):
    k = config.num_classes
    x_te, y_te = test if test is not None else (None, None)
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
        bad = [name for name, v in (("features", feats), ("logits", logits), ("train loss", tl))
               if not np.all(np.isfinite(v))]
        if bad:
            diverged(step, f"the tracked samples' {' and '.join(bad)} are not finite")
        buffer.append({"features": feats, "logits": logits, "step": step,
                       "time": step * config.lr, "train_loss": tl, "train_acc": ta,
                       "test_loss": vl, "test_acc": va})
        last.update(train_acc=ta, test_acc=va)
        if len(buffer) >= flush_rows:
            flush()

    def flush():
        ts._append(buffer)
        buffer.clear()

    last_ckpt = [start if os.path.exists(ts.checkpoint_path) else None]

    def diverged(step, what):
        kept = (f"the last good checkpoint (step {last_ckpt[0]}) is kept"
                if last_ckpt[0] is not None else "no checkpoint was written yet")
        raise TrainingDivergedError(
            f"training diverged at step {step}: {what}. The run was stopped and {kept}; the "
            f"same command would diverge again: lower the learning rate (lr = {config.lr:g}) or "
            "check the data")

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
            lv = float(loss.detach())
            if not math.isfinite(lv):
                diverged(step + 1, f"the loss of its batch is {lv}")
            loss.backward()
            optimizer.step()
            step += 1
            ema = lv if ema is None else 0.98 * ema + 0.02 * lv
            if is_log_step(step):
                log(step)
            if config.impacts_every > 0 and (step % config.impacts_every == 0):
                ts._append_impact(step, step * config.lr,
                                  *_measure_impacts(model, x_imp, y_imp, config))
            if step == total or (config.checkpoint_every and step % config.checkpoint_every == 0):
                flush()
                _save_checkpoint(ts.checkpoint_path, model, optimizer, order, step, config)
                last_ckpt[0] = step
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
