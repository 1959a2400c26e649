"""GeoMNIST runs of the LE-SDE paper (background.md section 5): LeNet, SGD batch 1, lr 0.005,
10,000 iterations, at label noise p_err in {0, 0.3, 0.67}, tracked.

One trajectory store per p_err is written under ``--store-dir`` (resumable: run the same command
again after an interruption); the small outputs go beside this file:

- ``geomnist_p{tag}_summary.npz`` (tag = 000, 030, 067): step, time (lr-scaled, step * lr) (T,),
  the four metrics (T,), the class-mean logits and features of the tracked train and test
  samples (T, 3, 3) and (T, 3, 84), and the measured impacts (impact_step, impact_time (T',),
  E (T', 3, 3), alpha, beta (T',));
- ``geomnist_p{tag}_metrics.csv``: step, time, train/test loss and accuracy;
- ``geomnist_config.json``: the TrainConfig of each run and the data set-up.

Data: ``make_geomnist(1000, seed=0, p_err, variant="analytic")`` for training (1,000 images per
class; the label noise is applied to the training labels only) and ``make_geomnist(300, seed=1,
variant="analytic")`` with clean labels as the test set -- the package's earlier GeoMNIST, not
the authors' (``figures/paper/`` holds the runs on the authors' data and protocol), so test loss/accuracy measure generalisation to the true shapes. The
three runs see the same images, the same initialisation and the same data order (seed 0); only
the training labels differ.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python figures/real/geomnist.py [--store-dir runs] [--p-err 0 0.3 0.67]
        [--steps 10000] [--export-only]

A run with ``--steps`` other than 10,000 gets the suffix ``_<steps>steps`` on its store and
output names (e.g. the 30,000-step check at p_err = 0.3: ``--p-err 0.3 --steps 30000``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
P_ERRS = (0.0, 0.3, 2.0 / 3.0)
N_TRAIN, N_TEST = 1000, 300
STEPS, LR = 10_000, 0.005


def tag(p_err: float) -> str:
    """``0 -> 'p000'``, ``0.3 -> 'p030'``, ``2/3 -> 'p067'``."""
    return f"p{int(round(100 * p_err)):03d}"


def make_config(p_err: float, steps: int = STEPS):
    """The run's configuration (K = 3, LeNet on 1x32x32, SGD batch 1, lr 0.005)."""
    from lesde.data import GEOMNIST_CLASSES
    from lesde.tracking import TrainConfig

    return TrainConfig(
        net="lenet", num_classes=3, net_kwargs={"in_channels": 1},
        optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0, batch_size=1,
        steps=steps, log_every=50, track_per_class=100, track_test_per_class=100,
        eval_train_size=-1, eval_test_size=-1, eval_batch_size=500, seed=0,
        dtype="float32", device="cpu", checkpoint_every=1000, impacts_every=1000,
        impacts_per_class=30, impacts_output="logits", class_names=GEOMNIST_CLASSES,
    )


def data(p_err: float):
    import torch

    from lesde.data import make_geomnist

    # these runs predate the authors' generator: they keep the earlier, analytic GeoMNIST
    tr = make_geomnist(N_TRAIN, seed=0, p_err=p_err, variant="analytic")
    te = make_geomnist(N_TEST, seed=1, p_err=0.0, variant="analytic")
    return ((torch.from_numpy(tr.images), torch.from_numpy(tr.labels)),
            (torch.from_numpy(te.images), torch.from_numpy(te.clean_labels)))


def train(store: str, p_err: float, steps: int) -> None:
    import torch

    from lesde.tracking import train_and_track

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tr, te = data(p_err)
    train_and_track(make_config(p_err, steps), tr, te, store, progress=True)


def export(store_path: str, p_err: float, suffix: str = "") -> dict:
    from lesde.tracking import load_store

    st = load_store(store_path)
    met = st.metrics()
    out = dict(met)
    out["p_err"] = np.float64(p_err)
    out["class_names"] = np.array(st.class_names)
    for split in ("train", "test"):
        out[f"class_mean_logits_{split}"] = st.class_means("logits", split).astype(np.float32)
        out[f"class_mean_features_{split}"] = st.class_means("features", split).astype(np.float32)
    imp = st.impacts()
    out.update(impact_step=imp["step"], impact_time=imp["time"], E=imp["E"],
               alpha=imp["alpha"], beta=imp["beta"])
    name = f"geomnist_{tag(p_err)}{suffix}"
    np.savez_compressed(os.path.join(HERE, f"{name}_summary.npz"), **out)
    keys = ["step", "time", "train_loss", "train_acc", "test_loss", "test_acc"]
    with open(os.path.join(HERE, f"{name}_metrics.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(keys)
        for row in zip(*(met[k] for k in keys)):
            w.writerow([int(row[0])] + [f"{float(v):.6g}" for v in row[1:]])
    return st.config.to_dict()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store-dir", default="runs", help="where the stores go (not committed)")
    ap.add_argument("--p-err", type=float, nargs="+", default=list(P_ERRS))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--export-only", action="store_true")
    args = ap.parse_args(argv)
    configs = {}
    for p in args.p_err:
        p = 2.0 / 3.0 if abs(p - 2.0 / 3.0) < 0.01 else p
        suffix = "" if args.steps == STEPS else f"_{args.steps}steps"   # longer/shorter runs
        store = os.path.join(args.store_dir, f"geomnist_{tag(p)}{suffix}")
        if not args.export_only:
            train(store, p, args.steps)
        configs[tag(p) + suffix] = export(store, p, suffix)
    cfg_path = os.path.join(HERE, "geomnist_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as fh:
            old = json.load(fh)
        old.get("runs", {}).update(configs)
        configs = old.get("runs", configs)
    doc = {"train": f"make_geomnist({N_TRAIN}, seed=0, p_err) (label noise on train only)",
           "test": f"make_geomnist({N_TEST}, seed=1, p_err=0), clean labels",
           "runs": configs}
    with open(cfg_path, "w") as fh:
        fh.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
