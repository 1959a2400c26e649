"""Published training protocols as named, runnable specifications: several tracked trials each.

Zhang, Wang & Su (NeurIPS 2021, arXiv 2110.05960) fit the LE-SDE to real networks trained on
their own protocol: a LeNet in float64, SGD with batch size 1 (one sample drawn uniformly per
iteration), constant learning rate, the validation set evaluated as training runs, and 100
independent trials per setting, all on the same data. Their public code (``src/datasets.py``,
``src/models.py``, ``src/utils.py`` and the notebook ``LE-SDE Experiments.ipynb``) fixes:

==================  =========================================  =========================================
protocol            ``zhang2021-geomnist``                     ``zhang2021-cifar10``
==================  =========================================  =========================================
data                GeoMNIST (:func:`lesde.data.                CIFAR-10 airplane, automobile, bird
                    geomnist_train_val`): 500 train + 500       (the first K = 3 classes): 2,000 train
                    validation images per class, label noise    images per class, 500 validation
                    ``p_err`` on the train labels only          images per class from the test split,
                                                                pixels normalised by 0.5 / 0.5
network             LeNet (conv 6@5x5, pool, conv 16@5x5,       the same on 3 channels
                    pool, FC 120, FC 84, FC 3), PyTorch's
                    default initialisation, float64
SGD                 batch 1, drawn with replacement, lr 0.005,  batch 1, with replacement, lr 0.001,
                    no momentum or weight decay, 10,000         30,000 iterations
                    iterations
settings            p_err = 0 (and 0.1 ... 0.8; here 0, 0.3,    K = 3
                    2/3)
==================  =========================================  =========================================

What they log, per iteration and trial: the logits of the one training sample drawn at that
iteration (before its step), its loss, and the loss and accuracy on the whole validation set.
Class means are averages over the 100 trials of the samples drawn at each iteration.

What is logged here [package choice], per trial, with :func:`lesde.tracking.train_and_track`:
a fixed tracked set of 100 training and 100 validation images per class (chosen by the trial's
seed), their penultimate features and logits every ``log_every`` iterations (50 for GeoMNIST,
200 for CIFAR-10); the loss and accuracy of the tracked training images (noisy labels) and of
600 of the 1,500 validation images for GeoMNIST (the 300 tracked and 300 more, fixed per
trial; clean labels), of the 300 tracked validation images for CIFAR-10, at the same times; the impact matrix measured on the network
(:func:`lesde.elasticity.measure_impacts`, 30 tracked images per class). Why not the authors'
every-iteration evaluation of the whole validation set: a float64 LeNet forward pass costs
about 0.2 ms (GeoMNIST) to 0.5 ms (CIFAR-10) per image on one CPU thread, against about
0.75 ms for a whole SGD step, so evaluating 1,500 images every iteration would make a trial
about 400 times longer; at the spacing and subset here the logging still takes about 80% of
a trial. A tracked set gives each trial its own class-mean trajectory, rather than a
mean over trials of one random draw per iteration. Other differences from the authors' code:
the CIFAR-10 images are drawn without replacement (theirs draw each class's 2,000 with
replacement, so about 18% are repeats); GeoMNIST's data are the same for every ``p_err``
(theirs regenerate them per setting); label noise moves exactly ``round(p_err n)`` labels per
class (theirs ``int(p_err n)``: the same counts at n = 500 for p_err = 0.3 and 2/3).

One protocol run is a directory::

    OUT/protocol.json                 the protocol (with any overrides); resuming checks it
    OUT/<setting>/trial_<i>/          one resumable trajectory store per trial (seed i)
    OUT/<setting>/trial_<i>.json      wall time and final metrics of a finished trial

Trials run in parallel over processes (``workers``) or on a ``distributed.Client``; each store
checkpoints, so running the same command again continues every unfinished trial and skips the
finished ones. :func:`summarize_protocol` collects the small outputs.

The third protocol, ``cifar10-resnet18-k10``, goes beyond the paper: ResNet-18 at a quarter of
its width on all ten CIFAR-10 classes (2,000 training images per class), SGD with momentum 0.9,
weight decay 5e-4 and batch 128 for 10 epochs (1,560 steps), with 50 training and 50 test
images per class tracked every 30 steps (their loss and accuracy are the logged metrics), the
impacts measured every 312 steps (two epochs) on 10 images per class, the read-out (W, b)
recorded at every logged step so that NC3 and NC4 of the real features can be followed over
training, and the model and optimizer kept every 390 steps for restarts of SGD from states
during training. Sized for a shared 2-core CPU (about 0.8 s per step of 128 images on one
thread when idle).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .tracking import TrainConfig

__all__ = [
    "Protocol",
    "PROTOCOLS",
    "get_protocol",
    "run_protocol",
    "protocol_trials",
    "summarize_protocol",
    "write_protocol_summary",
    "load_protocol",
    "load_head_log",
    "load_snapshot",
    "protocol_state",
]

_PROTOCOL_FILE = "protocol.json"
_HEAD_FILE = "head_log.npz"


@dataclass(frozen=True)
class Protocol:
    """A training protocol: data, network, optimiser and logging, run as several trials.

    Args:
        name: registry name.
        description: one line.
        reference: where the protocol comes from.
        dataset: "geomnist" (:func:`lesde.data.geomnist_train_val`, the authors' generator) or
            "cifar10" (:func:`lesde.data.load_cifar10`).
        config: the :class:`~lesde.tracking.TrainConfig` of every trial; trial i runs it with
            ``seed = i`` (initialisation, data order, tracked set and evaluation subsets).
        train_per_class: training images per class.
        val_per_class: validation images per class (GeoMNIST: the held-out part of the sweep;
            CIFAR-10: drawn from the test split; None: the whole test split).
        classes: CIFAR-10 classes (names), in label order.
        p_errs: label-noise levels, one setting each (GeoMNIST; CIFAR-10: ``(0.0,)``).
        trials: trials per setting run by default.
        paper_trials: trials per setting in the publication (for the record).
        data_seed: seed of the data (images, split, label noise), the same for every trial.
        record_head: record the read-out layer ``(W, b)`` at every logged step
            (``<store>/head_log.npz``, see :func:`load_head_log`) for NC3 / NC4 over training.
        snapshot_every: keep the model and optimizer state every this many steps
            (``<store>/snapshots/step_<s>.pt``, see :func:`load_snapshot`; 0 = none), to
            restart replicas of SGD from states during training.
    """

    name: str
    description: str
    reference: str
    dataset: str
    config: TrainConfig
    train_per_class: int
    val_per_class: Optional[int]
    classes: Tuple[str, ...] = ()
    p_errs: Tuple[float, ...] = (0.0,)
    trials: int = 10
    paper_trials: int = 100
    data_seed: int = 0
    record_head: bool = False
    snapshot_every: int = 0

    def __post_init__(self):
        if self.dataset not in ("geomnist", "cifar10"):
            raise ValueError(f"dataset must be 'geomnist' or 'cifar10', got {self.dataset!r}")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "p_errs", tuple(float(p) for p in self.p_errs))
        if not self.p_errs or any(not 0.0 <= p <= 1.0 for p in self.p_errs):
            raise ValueError(f"p_errs must be label-noise levels in [0, 1], got {self.p_errs}")
        if self.dataset == "cifar10":
            if len(self.classes) != self.config.num_classes:
                raise ValueError(f"{len(self.classes)} classes for num_classes = "
                                 f"{self.config.num_classes}")
            if any(p > 0 for p in self.p_errs):
                raise ValueError("label noise is only defined here for GeoMNIST")
        if self.train_per_class < 1 or (self.val_per_class is not None and self.val_per_class < 1):
            raise ValueError("train_per_class and val_per_class must be positive")
        if self.trials < 1:
            raise ValueError(f"trials must be at least 1, got {self.trials}")

    # -- names and paths ----------------------------------------------------------------------
    @staticmethod
    def setting_name(p_err: float) -> str:
        """``0 -> 'p000'``, ``0.3 -> 'p030'``, ``2/3 -> 'p067'`` (percent, rounded)."""
        return f"p{int(round(100 * float(p_err))):03d}"

    def trial_config(self, trial: int) -> TrainConfig:
        """The config of trial ``trial`` (its seed)."""
        return dataclasses.replace(self.config, seed=int(trial))

    def with_overrides(self, **overrides) -> "Protocol":
        """A copy with protocol fields and/or TrainConfig fields replaced (e.g. a short test
        run: ``steps=300, log_every=20``). Unknown names are an error that names them."""
        proto_fields = {f.name for f in dataclasses.fields(self)} - {"config"}
        cfg_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(overrides) - proto_fields - cfg_fields)
        if unknown:
            raise ValueError(f"unknown protocol or TrainConfig fields: {', '.join(unknown)}")
        cfg = {k: v for k, v in overrides.items() if k in cfg_fields and k not in proto_fields}
        proto = {k: v for k, v in overrides.items() if k in proto_fields}
        if "p_errs" in proto:
            proto["p_errs"] = tuple(_canonical_p(p) for p in proto["p_errs"])
        if "steps" in cfg and "epochs" not in cfg:      # a length replaces the other kind
            cfg["epochs"] = 0.0
        elif "epochs" in cfg and "steps" not in cfg:
            cfg["steps"] = 0
        config = dataclasses.replace(self.config, **cfg) if cfg else self.config
        return dataclasses.replace(self, config=config, **proto)

    # -- JSON round trip ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["config"] = self.config.to_dict()
        d["classes"] = list(self.classes)
        d["p_errs"] = list(self.p_errs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        d = dict(d)
        d["config"] = TrainConfig.from_dict(d["config"])
        d["classes"] = tuple(d.get("classes", ()))
        d["p_errs"] = tuple(d.get("p_errs", (0.0,)))
        return cls(**d)

    # -- data ---------------------------------------------------------------------------------
    def data(self, p_err: float = 0.0, data_path: Optional[str] = None):
        """``((x_train, y_train), (x_val, y_val))`` tensors of the setting ``p_err``.

        Images are float32 (the training casts them to the config's dtype); validation labels
        are the clean labels.
        """
        import torch

        if self.dataset == "geomnist":
            from .data import geomnist_train_val

            tr, va = geomnist_train_val(self.train_per_class, self.val_per_class or 500,
                                        seed=self.data_seed, p_err=p_err)
            return ((torch.from_numpy(tr.images), torch.from_numpy(tr.labels)),
                    (torch.from_numpy(va.images), torch.from_numpy(va.clean_labels)))
        from .data import load_cifar10

        path = data_path or os.environ.get("LESDE_CIFAR10", "")
        if not path:
            raise ValueError(f"protocol {self.name} needs CIFAR-10: pass data_path (--data-path) "
                             "or set LESDE_CIFAR10 to the CIFAR-10 zip, image folder or "
                             "cifar-10-batches-py directory")
        train = load_cifar10(path, "train", classes=list(self.classes),
                             per_class=self.train_per_class, seed=self.data_seed, as_tensor=True)
        val = load_cifar10(path, "test", classes=list(self.classes),
                           per_class=self.val_per_class, seed=self.data_seed, as_tensor=True)
        return train, val


def _canonical_p(p: float) -> float:
    """2/3 typed as 0.667 or 0.67 is the random-label point 2/3."""
    p = float(p)
    return 2.0 / 3.0 if abs(p - 2.0 / 3.0) < 0.005 else p


def _zhang2021_geomnist() -> Protocol:
    from .data import GEOMNIST_CLASSES

    return Protocol(
        name="zhang2021-geomnist",
        description="GeoMNIST, LeNet float64, SGD batch 1 (with replacement), lr 0.005, "
                    "10,000 iterations, at p_err 0, 0.3, 2/3",
        reference="Zhang, Wang & Su, NeurIPS 2021 (arXiv 2110.05960), section 5 and their "
                  "code's 'LE-SDE Experiments' notebook",
        dataset="geomnist",
        config=TrainConfig(
            net="lenet", num_classes=3, net_kwargs={"in_channels": 1}, optimizer="sgd",
            lr=0.005, momentum=0.0, weight_decay=0.0, batch_size=1, steps=10_000,
            log_every=50, track_per_class=100, track_test_per_class=100, eval_train_size=0,
            eval_test_size=600, eval_batch_size=500, seed=0, dtype="float64", device="cpu",
            checkpoint_every=1000, impacts_every=500, impacts_per_class=30,
            impacts_output="logits", class_names=GEOMNIST_CLASSES, sampling="replacement"),
        train_per_class=500, val_per_class=500, p_errs=(0.0, 0.3, 2.0 / 3.0), trials=10)


def _zhang2021_cifar10() -> Protocol:
    classes = ("airplane", "automobile", "bird")
    return Protocol(
        name="zhang2021-cifar10",
        description="CIFAR-10 airplane/automobile/bird, LeNet float64, SGD batch 1 (with "
                    "replacement), lr 0.001, 30,000 iterations",
        reference="Zhang, Wang & Su, NeurIPS 2021 (arXiv 2110.05960), section 5 and their "
                  "code's 'LE-SDE Experiments' notebook",
        dataset="cifar10",
        config=TrainConfig(
            net="lenet", num_classes=3, net_kwargs={"in_channels": 3}, optimizer="sgd",
            lr=0.001, momentum=0.0, weight_decay=0.0, batch_size=1, steps=30_000,
            log_every=200, track_per_class=100, track_test_per_class=100, eval_train_size=0,
            eval_test_size=0, eval_batch_size=500, seed=0, dtype="float64", device="cpu",
            checkpoint_every=2000, impacts_every=1000, impacts_per_class=30,
            impacts_output="logits", class_names=classes, sampling="replacement"),
        train_per_class=2000, val_per_class=500, classes=classes, trials=5)


def _cifar10_resnet18_k10() -> Protocol:
    from .data import CIFAR10_CLASSES

    return Protocol(
        name="cifar10-resnet18-k10",
        description="CIFAR-10, all ten classes, ResNet-18 at width 1/4, SGD momentum 0.9, "
                    "weight decay 5e-4, batch 128, lr 0.02, 10 epochs",
        reference="beyond Zhang, Wang & Su (2021): their K = 3 LeNet study at K = 10 on a "
                  "modern network",
        dataset="cifar10",
        config=TrainConfig(
            net="resnet18", num_classes=10, net_kwargs={"width": 0.25, "in_channels": 3},
            optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=5e-4, batch_size=128,
            epochs=10.0, log_every=30, track_per_class=50, track_test_per_class=50,
            eval_train_size=0, eval_test_size=0, eval_batch_size=250, seed=0,
            dtype="float32", device="cpu", checkpoint_every=90, impacts_every=312,
            impacts_per_class=10, impacts_output="logits", class_names=CIFAR10_CLASSES),
        train_per_class=2000, val_per_class=None, classes=CIFAR10_CLASSES, trials=1,
        paper_trials=0, record_head=True, snapshot_every=390)


PROTOCOLS: Dict[str, Protocol] = {p.name: p for p in (
    _zhang2021_geomnist(), _zhang2021_cifar10(), _cifar10_resnet18_k10())}
"""The registered protocols by name."""


def get_protocol(name) -> Protocol:
    """The registered protocol ``name`` (a :class:`Protocol` is returned as is)."""
    if isinstance(name, Protocol):
        return name
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# --------------------------------------------------------------------------------------------
# the read-out over training (NC3 / NC4 need W(t), b(t))
# --------------------------------------------------------------------------------------------
class _HeadLog:
    """Records ``(step, W, b)`` of the network's head at the logged steps of a run.

    Written atomically to ``<store>/head_log.npz`` at the run's checkpoint steps and at its end;
    a resumed run drops the entries logged after the step it resumes from (the first callback
    tells it), so the log equals that of an uninterrupted run. Step 0 is the head of the
    initial network, rebuilt from the config's seed exactly as the training builds it.
    """

    def __init__(self, store: str, config: TrainConfig, total: int):
        self.path = os.path.join(store, _HEAD_FILE)
        self.config, self.total = config, int(total)
        self.first = True
        self.steps, self.W, self.b = [], [], []
        if os.path.exists(self.path):
            with np.load(self.path) as z:
                self.steps = [int(s) for s in z["step"]]
                self.W, self.b = list(z["W"]), list(z["b"])
        else:
            import torch

            from .tracking import _build_model

            torch.manual_seed(config.seed)
            model = _build_model(config, device="cpu")
            self._record(0, model)

    def _record(self, step, model):
        self.steps.append(int(step))
        self.W.append(model.head.weight.detach().cpu().double().numpy().copy())
        self.b.append(model.head.bias.detach().cpu().double().numpy().copy())

    def save(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, step=np.asarray(self.steps, dtype=np.int64), W=np.stack(self.W),
                 b=np.stack(self.b))
        os.replace(tmp, self.path)

    def __call__(self, step, model, optimizer):
        if self.first:  # the first step after (re)starting: drop what a crash left behind
            keep = [i for i, s in enumerate(self.steps) if s < step]
            self.steps = [self.steps[i] for i in keep]
            self.W = [self.W[i] for i in keep]
            self.b = [self.b[i] for i in keep]
            self.first = False
        c = self.config
        if step % c.log_every == 0 or step == self.total:
            self._record(step, model)
        if step == self.total or (c.checkpoint_every and step % c.checkpoint_every == 0):
            self.save()


class _Snapshots:
    """Keeps ``{"step", "model", "optimizer"}`` every ``every`` steps in ``<store>/snapshots``."""

    def __init__(self, store: str, every: int):
        self.dir = os.path.join(store, "snapshots")
        self.every = int(every)

    def __call__(self, step, model, optimizer):
        if step % self.every:
            return
        import torch

        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"step_{int(step):06d}.pt")
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save({"step": int(step), "model": model.state_dict(),
                    "optimizer": optimizer.state_dict()}, tmp)
        os.replace(tmp, path)


def load_snapshot(store, step: int, map_location: str = "cpu"):
    """The network and optimizer of a protocol trial at a kept snapshot step.

    Returns ``(model, optimizer, config)``: the model (train mode, the run's dtype) and a
    fresh optimizer of the run's kind with the saved state (e.g. SGD momentum buffers) loaded.
    The file is read with ``torch.load(weights_only=True)``: it holds tensors and plain data
    only, and anything else is refused. Raises FileNotFoundError when no snapshot was kept
    at ``step``.
    """
    import torch

    from .tracking import _build_model, _make_optimizer, load_store

    st = load_store(store)
    path = os.path.join(os.fspath(store), "snapshots", f"step_{int(step):06d}.pt")
    if not os.path.exists(path):
        have = sorted(os.listdir(os.path.dirname(path))) if os.path.isdir(
            os.path.dirname(path)) else []
        raise FileNotFoundError(f"{store}: no snapshot at step {step} (kept: "
                                f"{', '.join(have) or 'none'})")
    state = torch.load(path, map_location=map_location, weights_only=True)
    config = st.config
    model = _build_model(config, device=map_location)
    model.load_state_dict(state["model"])
    optimizer = _make_optimizer(config, model.parameters())
    optimizer.load_state_dict(state["optimizer"])
    model.train()
    return model, optimizer, config


def load_head_log(store) -> Dict[str, np.ndarray]:
    """``{"step": (T,), "W": (T, K, p), "b": (T, K)}`` recorded by a protocol with
    ``record_head``; raises FileNotFoundError when the run did not record it."""
    path = os.path.join(os.fspath(store), _HEAD_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{store} has no head log ({_HEAD_FILE}); it is written by "
                                "protocols with record_head")
    with np.load(path) as z:
        return {k: np.asarray(z[k]) for k in ("step", "W", "b")}


# --------------------------------------------------------------------------------------------
# running the trials
# --------------------------------------------------------------------------------------------
_DATA_CACHE: Dict[tuple, tuple] = {}


def _trial_dir(out: str, proto: Protocol, p_err: float, trial: int) -> str:
    return os.path.join(out, proto.setting_name(p_err), f"trial_{int(trial):03d}")


def _run_trial(proto_dict: dict, p_err: float, trial: int, store: str,
               data_path: Optional[str], threads: Optional[int], progress: bool) -> dict:
    """Run (or resume) one trial; top-level so that worker processes can import it."""
    import torch

    from .tracking import train_and_track

    if threads:
        torch.set_num_threads(int(threads))
    proto = Protocol.from_dict(proto_dict)
    key = (json.dumps(proto_dict, sort_keys=True), float(p_err), data_path)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = proto.data(p_err, data_path)
    train, val = _DATA_CACHE[key]
    config = proto.trial_config(trial)
    calls = []
    head = None
    if proto.record_head:
        head = _HeadLog(store, config, config.total_steps(len(train[1])))
        calls.append(head)
    if proto.snapshot_every > 0:
        calls.append(_Snapshots(store, proto.snapshot_every))

    def callback(step, model, optimizer):
        for call in calls:
            call(step, model, optimizer)
    t0 = time.perf_counter()
    st = train_and_track(config, train, val, store, progress=progress,
                         callback=callback if calls else None)
    wall = time.perf_counter() - t0
    if head is not None and st.complete:
        head.save()
    m = st.metrics()
    return {"trial": int(trial), "p_err": float(p_err), "store": store,
            "complete": bool(st.complete), "wall_seconds": wall,
            "final": {k: float(m[k][-1]) for k in ("train_loss", "train_acc", "test_loss",
                                                    "test_acc")}}


_FIELD_DEFAULTS = {"record_head": False, "snapshot_every": 0}


def _check_directory(out: str, proto: Protocol) -> None:
    path = os.path.join(out, _PROTOCOL_FILE)
    want = proto.to_dict()
    want.pop("trials", None)  # adding trials later is a resume, not a new protocol
    want["p_errs"] = None     # settings may be added or run separately
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        for k, v in _FIELD_DEFAULTS.items():   # fields added after the run was started
            have.setdefault(k, v)
        same_config = TrainConfig.from_dict(have.get("config", {})) == proto.config
        have["config"] = want["config"] if same_config else have.get("config")
        if have != want:
            diff = [k for k in want if have.get(k) != want[k]]
            raise ValueError(f"{out} holds a run of another protocol (differs in "
                             f"{', '.join(diff) or 'its fields'}); use another directory")
        return
    os.makedirs(out, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(want, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _trial_record(store: str) -> Optional[dict]:
    path = store + ".json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_protocol(protocol, out: str, *, trials: Optional[int] = None,
                 p_errs: Optional[Sequence[float]] = None, workers: int = 1, client=None,
                 data_path: Optional[str] = None, threads: Optional[int] = 1,
                 progress: bool = True, **overrides) -> list:
    """Run (or resume) the trials of a protocol; returns one record per trial.

    Args:
        protocol: a :class:`Protocol` or a registered name (:data:`PROTOCOLS`).
        out: the run directory (see the module docstring). A directory holding another
            protocol (other fields or overrides) is refused.
        trials: trials per setting (default ``protocol.trials``); trial i has seed i, so
            asking for more trials later adds trials and keeps the finished ones.
        p_errs: the settings to run (default all of ``protocol.p_errs``).
        workers: processes running trials at once (each with ``threads`` torch threads).
        client: a ``distributed.Client``; trials are then submitted to it instead.
        data_path: CIFAR-10 location (default ``$LESDE_CIFAR10``).
        threads: torch threads per trial (default 1; None leaves torch's setting).
        progress: progress bars (over trials; with one worker also within the trial).
        **overrides: protocol or TrainConfig fields to replace (e.g. ``steps=300`` for a
            short test); they are stored with the run, so a resume must give the same ones.

    Each record: ``trial``, ``p_err``, ``store``, ``complete``, ``wall_seconds`` (summed over
    the sessions that ran it) and ``final`` (the last logged train/test loss and accuracy);
    also written beside the store as ``trial_<i>.json``.
    """
    proto = get_protocol(protocol)
    if overrides:
        proto = proto.with_overrides(**overrides)
    n_trials = int(proto.trials if trials is None else trials)
    if n_trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    settings = proto.p_errs if p_errs is None else tuple(_canonical_p(p) for p in p_errs)
    for p in settings:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p_err must lie in [0, 1], got {p}")
        if proto.dataset == "cifar10" and p > 0:
            raise ValueError("label noise is only defined here for GeoMNIST")
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out = os.fspath(out)
    _check_directory(out, proto)
    proto_dict = proto.to_dict()
    jobs, records = [], []
    for i in range(n_trials):          # trial by trial, so that every setting advances
        for p in settings:
            store = _trial_dir(out, proto, p, i)
            rec = _trial_record(store)
            if rec is not None and rec.get("complete"):
                records.append(rec)
            else:
                jobs.append((p, i, store))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs) + len(records), initial=len(records), unit="trial",
                   desc=proto.name, dynamic_ncols=True)

    def finish(rec):
        prev = _trial_record(rec["store"])
        if prev is not None:
            rec["wall_seconds"] += float(prev.get("wall_seconds", 0.0))
        tmp = rec["store"] + ".json.tmp"
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1, sort_keys=True)
        os.replace(tmp, rec["store"] + ".json")
        records.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(test_acc=f"{rec['final']['test_acc']:.3f}", refresh=False)

    try:
        if client is not None:
            from distributed import as_completed

            futs = [client.submit(_run_trial, proto_dict, p, i, s, data_path, threads or 1,
                                  False, pure=False) for p, i, s in jobs]
            for fut in as_completed(futs):
                finish(fut.result())
        elif int(workers) == 1 or len(jobs) <= 1:
            for p, i, s in jobs:
                finish(_run_trial(proto_dict, p, i, s, data_path, threads,
                                  progress and len(jobs) == 1))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=int(workers), mp_context=ctx) as pool:
                futs = [pool.submit(_run_trial, proto_dict, p, i, s, data_path, threads,
                                    False) for p, i, s in jobs]
                for fut in as_completed(futs):
                    finish(fut.result())
    finally:
        if bar is not None:
            bar.close()
    records.sort(key=lambda r: (r["p_err"], r["trial"]))
    return records


def protocol_trials(out: str) -> Dict[str, list]:
    """The trial stores under a protocol run directory, by setting name, in trial order."""
    out = os.fspath(out)
    if not os.path.exists(os.path.join(out, _PROTOCOL_FILE)):
        raise FileNotFoundError(f"{out} is not a protocol run directory (no {_PROTOCOL_FILE})")
    found = {}
    for setting in sorted(os.listdir(out)):
        d = os.path.join(out, setting)
        if not os.path.isdir(d):
            continue
        stores = sorted(os.path.join(d, t) for t in os.listdir(d)
                        if t.startswith("trial_") and os.path.isdir(os.path.join(d, t)))
        if stores:
            found[setting] = stores
    return found


def load_protocol(out: str) -> Protocol:
    """The protocol (with its overrides) that a run directory was made with."""
    with open(os.path.join(os.fspath(out), _PROTOCOL_FILE)) as f:
        d = json.load(f)
    d["p_errs"] = d.get("p_errs") or (0.0,)
    d.setdefault("trials", 1)
    return Protocol.from_dict(d)


# --------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------
def summarize_protocol(out: str, *, complete_only: bool = True, nc: bool = False) -> dict:
    """Small outputs of a protocol run, per setting, stacked over trials.

    For each setting (``"p000"``, ...): ``step`` and ``time`` (T,); ``train_loss``,
    ``train_acc``, ``test_loss``, ``test_acc`` (R, T) (test = the validation set);
    ``class_mean_logits_train`` / ``_test`` (R, T, K, K) and ``spread_logits_train`` (R, T, K),
    the root-mean-square distance of a class's tracked logits to their class mean;
    ``impact_step`` (T',), ``E`` (R, T', K, K), ``alpha_hat``, ``beta_hat`` (R, T') when
    measured; ``trials`` (R,) and ``wall_seconds`` (R,); and a first look with the existing
    I-estimator (:class:`lesde.fit.IEstimator`, class means of the tracked training logits,
    its default on_reversed="abs", so no logged time is dropped): ``A``, ``B`` (R, T) per
    trial and ``A_pooled``, ``B_pooled`` (T,) from the class means averaged over the trials
    (the authors pool their trials that way).
    With ``nc=True`` also NC1, NC2 (three terms), NC3, NC4 of the tracked training
    features over time (R, T) from the recorded read-out (:func:`load_head_log`).

    Trials whose store is unfinished are left out with ``complete_only`` (default).
    """
    import warnings

    from .fit import IEstimator, as_trajectory
    from .tracking import load_store

    result = {}
    for setting, stores in protocol_trials(out).items():
        sts = [load_store(s) for s in stores]
        if complete_only:
            keep = [i for i, st in enumerate(sts) if st.complete]
            stores, sts = [stores[i] for i in keep], [sts[i] for i in keep]
        if not sts:
            continue
        T = min(len(st) for st in sts)
        first = sts[0]
        rec = {"step": first.step[:T], "time": first.time[:T],
               "trials": np.array([st.config.seed for st in sts]),
               "class_names": np.array(first.class_names)}
        walls = []
        for s in stores:
            r = _trial_record(s)
            walls.append(np.nan if r is None else float(r.get("wall_seconds", np.nan)))
        rec["wall_seconds"] = np.array(walls)
        for name in ("train_loss", "train_acc", "test_loss", "test_acc"):
            rec[name] = np.stack([st.array(name)[:T] for st in sts])
        K = first.config.num_classes
        for split in ("train", "test"):
            if np.any(first.split == (0 if split == "train" else 1)):
                rec[f"class_mean_logits_{split}"] = np.stack(
                    [st.class_means("logits", split)[:T] for st in sts]).astype(np.float32)
        spreads = []
        for st in sts:
            sel = st.split == 0
            z = st.array("logits")[:T][:, sel]
            lab = st.labels[sel]
            spreads.append(np.stack([np.sqrt(((z[:, lab == c] - z[:, lab == c].mean(1,
                                      keepdims=True)) ** 2).sum(-1).mean(1)) for c in range(K)],
                                    axis=1))
        rec["spread_logits_train"] = np.stack(spreads).astype(np.float32)
        if first.config.impacts_every > 0:
            imps = [st.impacts() for st in sts]
            Ti = min(len(i["step"]) for i in imps)
            rec["impact_step"] = imps[0]["step"][:Ti]
            rec["impact_time"] = imps[0]["time"][:Ti]
            rec["E"] = np.stack([i["E"][:Ti] for i in imps])
            rec["alpha_hat"] = np.stack([i["alpha"][:Ti] for i in imps])
            rec["beta_hat"] = np.stack([i["beta"][:Ti] for i in imps])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nan = np.full(T, np.nan)
            A, B = [], []
            for st in sts:
                try:
                    est = IEstimator(n_bootstrap=0).fit(as_trajectory(st))
                    A.append(est.A_[:T])
                    B.append(est.B_[:T])
                except ValueError:      # too few logged times for the derivative
                    A.append(nan)
                    B.append(nan)
            rec["A"], rec["B"] = np.stack(A), np.stack(B)
            means = rec["class_mean_logits_train"].astype(np.float64).mean(axis=0)  # (T, K, K)
            try:
                pooled = IEstimator(n_bootstrap=0).fit((rec["time"], means, np.arange(K)))
                rec["A_pooled"], rec["B_pooled"] = pooled.A_, pooled.B_
            except ValueError:
                rec["A_pooled"], rec["B_pooled"] = nan, nan
        if nc:
            rec.update(_nc_over_training(sts, stores, T))
        result[setting] = rec
    return result


def _nc_over_training(sts, stores, T) -> dict:
    """NC1, NC2 terms, NC3, NC4 of the tracked training features over time, per trial."""
    from .metrics import neural_collapse

    out = {k: [] for k in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_etf", "nc3", "nc4")}
    for st, s in zip(sts, stores):
        head = load_head_log(s)
        sel = st.split == 0
        steps = st.step[:T]
        idx = np.searchsorted(head["step"], steps)
        if np.any(idx >= len(head["step"])) or not np.array_equal(head["step"][idx], steps):
            raise ValueError(f"{s}: the head log does not cover the logged steps")
        X = st.array("features")[:T][:, sel].astype(np.float64)
        res = neural_collapse(X, st.labels[sel], W=head["W"][idx], b=head["b"][idx],
                              num_classes=st.config.num_classes)
        vals = dataclasses.astuple(res) if dataclasses.is_dataclass(res) else tuple(res)
        for k, v in zip(out, vals):
            out[k].append(np.asarray(v, dtype=np.float64))
    return {k: np.stack(v) for k, v in out.items()}


def _mean_sd(x: np.ndarray, axis: int = 0):
    x = np.asarray(x, dtype=np.float64)
    n = np.sum(np.isfinite(x), axis=axis)
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(x, axis=axis)
            sd = np.nanstd(x, axis=axis, ddof=1) if np.max(n) > 1 else np.full_like(mean, np.nan)
    return mean, sd


def _fmt(mean, sd, digits=3):
    if not np.isfinite(mean):
        return "-"
    if not np.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} +- {sd:.{digits}f}"


def write_protocol_summary(out: str, dest: str, *, nc: bool = False,
                           figure: bool = True) -> list:
    """Write the small outputs of a protocol run to ``dest``; returns the files written.

    - ``protocol.json``: the protocol and TrainConfig the trials ran with;
    - ``<setting>_summary.npz``: everything :func:`summarize_protocol` returns for the setting
      (per-trial metrics, class-mean logits, within-class spread, measured impacts, the
      I-estimator's A, B per trial and pooled; NC1-NC4 with ``nc``);
    - ``<setting>_metrics.csv``: mean and standard deviation over the trials of the train /
      validation loss and accuracy at every logged step;
    - ``trials.csv``: one row per trial: final metrics, A(T), B(T) (first look, I-estimator),
      wall time;
    - ``summary.md``: per setting, the final validation accuracy and loss (mean +- sd over
      trials, range, chance level), A(T) and B(T) per trial (mean +- sd) and pooled over trials,
      the measured alpha_hat / beta_hat at the end, and the wall time per trial;
    - ``summary.png`` (with ``figure``): :func:`lesde.figures.plot_protocol_summary`.
    """
    import csv

    summ = summarize_protocol(out, nc=nc)
    if not summ:
        raise ValueError(f"{out}: no finished trial to summarise")
    proto = load_protocol(out)
    os.makedirs(dest, exist_ok=True)
    files = []
    path = os.path.join(dest, "protocol.json")
    d = proto.to_dict()
    d.pop("trials", None)
    d["p_errs"] = None
    with open(path, "w") as f:
        json.dump(d, f, indent=1, sort_keys=True)
        f.write("\n")
    files.append(path)
    metric_names = ("train_loss", "train_acc", "test_loss", "test_acc")
    rows = []
    for setting, rec in summ.items():
        path = os.path.join(dest, f"{setting}_summary.npz")
        np.savez_compressed(path, **{k: (v.astype(np.float32) if isinstance(v, np.ndarray)
                                         and v.dtype == np.float64 and v.ndim >= 2 else v)
                                     for k, v in rec.items()})
        files.append(path)
        path = os.path.join(dest, f"{setting}_metrics.csv")
        stats = {m: _mean_sd(rec[m]) for m in metric_names}
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "time", "trials"] + [f"{m}_{s}" for m in metric_names
                                                       for s in ("mean", "sd")])
            for j in range(len(rec["step"])):
                w.writerow([int(rec["step"][j]), f"{rec['time'][j]:.6g}", len(rec["trials"])]
                           + [f"{stats[m][i][j]:.6g}" for m in metric_names for i in (0, 1)])
        files.append(path)
        for i, trial in enumerate(rec["trials"]):
            row = {"setting": setting, "trial": int(trial)}
            row.update({m: float(rec[m][i, -1]) for m in metric_names})
            row.update(A_T=float(rec["A"][i, -1]), B_T=float(rec["B"][i, -1]),
                       wall_seconds=float(rec["wall_seconds"][i]))
            if "alpha_hat" in rec:
                row.update(alpha_hat_T=float(rec["alpha_hat"][i, -1]),
                           beta_hat_T=float(rec["beta_hat"][i, -1]))
            rows.append(row)
    path = os.path.join(dest, "trials.csv")
    with open(path, "w", newline="") as f:
        keys = list(rows[0])
        for r in rows:
            keys += [k for k in r if k not in keys]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    files.append(path)

    K = proto.config.num_classes
    lines = [f"# {proto.name}: summary of the trials", "",
             f"{proto.description}. {proto.reference}.", "",
             f"Validation = {proto.val_per_class or 'all'} held-out images per class with clean "
             f"labels; chance: accuracy {1 / K:.3f}, loss log {K} = {np.log(K):.3f}. Values are "
             "mean +- standard deviation over the trials, [min, max] in brackets, at the last "
             f"logged step. A(T), B(T): a first look with the existing I-estimator "
             "(`lesde.fit.IEstimator`, tracked training logits), per trial and on the class "
             "means pooled over the trials (as the authors pool theirs); not the trajectory-"
             "matching fit.", "",
             "| setting | trials | steps | validation accuracy | validation loss | train accuracy "
             "(tracked, noisy labels) | A(T) per trial | B(T) per trial | A(T), B(T) pooled | "
             "measured alpha_hat / beta_hat at the end | wall time per trial |",
             "|---|---:|---:|---|---|---|---|---|---|---|---|"]
    for setting, rec in summ.items():
        acc, loss = rec["test_acc"][:, -1], rec["test_loss"][:, -1]
        tr = rec["train_acc"][:, -1]
        A, B = rec["A"][:, -1], rec["B"][:, -1]
        ratio = "-"
        if "alpha_hat" in rec:
            r = rec["alpha_hat"][:, -1] / rec["beta_hat"][:, -1]
            ratio = _fmt(*[float(v) for v in _mean_sd(r)], digits=2)
        wall = rec["wall_seconds"]
        lines.append(
            f"| {setting} | {len(acc)} | {int(rec['step'][-1])} | "
            f"{_fmt(*_mean_sd(acc))} [{np.min(acc):.3f}, {np.max(acc):.3f}] | "
            f"{_fmt(*_mean_sd(loss))} [{np.min(loss):.3f}, {np.max(loss):.3f}] | "
            f"{_fmt(*_mean_sd(tr))} | {_fmt(*_mean_sd(A), digits=2)} | "
            f"{_fmt(*_mean_sd(B), digits=2)} | {rec['A_pooled'][-1]:.2f}, "
            f"{rec['B_pooled'][-1]:.2f} | {ratio} | "
            f"{np.nanmean(wall) / 60:.1f} min |")
    path = os.path.join(dest, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    files.append(path)
    if figure:
        from .figures import plot_protocol_summary

        files.append(plot_protocol_summary(summ, os.path.join(dest, "summary.png"),
                                           title=proto.name, lr=proto.config.lr))
    return files


def _setting_p_err(setting: str) -> float:
    if not (len(setting) == 4 and setting[0] == "p" and setting[1:].isdigit()):
        raise ValueError(f"setting names look like 'p000', 'p030', 'p067'; got {setting!r}")
    return _canonical_p(int(setting[1:]) / 100.0)


def protocol_state(out: str, setting: str, trial: int, step: int, *,
                   data_path: Optional[str] = None, scratch: Optional[str] = None):
    """The network and optimizer of a protocol trial at optimizer step ``step``, with its data.

    From a kept snapshot when there is one (:func:`load_snapshot`); otherwise the trial is run
    again from its start to ``step`` (the same config, seed and data: the same trajectory; only
    the logging is thinned, which draws no random numbers) in a temporary store, and checked
    against the original log: when ``step`` is a logged step, the re-run's tracked logits must
    equal the logged ones (``max_logit_diff`` in the returned info, an error above 1e-6 of
    their scale).

    Returns ``(model, optimizer, (train, val), info)``; ``info`` has ``source`` ("snapshot" or
    "rerun"), ``max_logit_diff`` and the trial's ``config``.
    """
    import shutil
    import tempfile

    import torch

    from .tracking import load_store, train_and_track

    proto = load_protocol(out)
    p_err = _setting_p_err(setting)
    store = _trial_dir(out, proto, p_err, trial)
    st = load_store(store)
    config = st.config
    train, val = proto.data(p_err, data_path)
    info = {"config": config, "max_logit_diff": float("nan")}
    snap = os.path.join(store, "snapshots", f"step_{int(step):06d}.pt")
    if os.path.exists(snap):
        model, opt, _ = load_snapshot(store, step)
        info["source"] = "snapshot"
    else:
        thin = dataclasses.replace(config, log_every=max(1, int(step)), impacts_every=0,
                                   checkpoint_every=0)
        grabbed = {}

        def grab(s, model, optimizer):
            if s == step:
                grabbed["model"] = copy.deepcopy(model.state_dict())
                grabbed["opt"] = copy.deepcopy(optimizer.state_dict())

        tmp = tempfile.mkdtemp(prefix="lesde-state-", dir=scratch)
        try:
            train_and_track(thin, train, val, os.path.join(tmp, "store"), progress=False,
                            callback=grab, until_step=int(step))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if "model" not in grabbed:
            raise ValueError(f"step {step} is beyond the trial's {config.total_steps(len(train[1]))}"
                             " steps")
        from .tracking import _build_model, _make_optimizer

        model = _build_model(config, device="cpu")
        model.load_state_dict(grabbed["model"])
        opt = _make_optimizer(config, model.parameters())
        opt.load_state_dict(grabbed["opt"])
        info["source"] = "rerun"
    logged = np.flatnonzero(st.step == int(step))
    if len(logged):
        sel = st.split == 0
        x = train[0][torch.as_tensor(st.index[sel])].to(config.torch_dtype)
        model.eval()
        with torch.no_grad():
            z = model(x).double().numpy()
        model.train()
        want = st["logits"][int(logged[0])][sel]
        diff = float(np.max(np.abs(z - want)))
        info["max_logit_diff"] = diff
        if diff > 1e-6 * max(1.0, float(np.max(np.abs(want)))):
            raise ValueError(f"{store}: the state rebuilt at step {step} does not reproduce the "
                             f"logged logits (max difference {diff:.3g})")
    return model, opt, (train, val), info
