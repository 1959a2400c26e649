"""The committed real run: ResNet-18 (width 1/4) on three CIFAR-10 classes, tracked.

Trains with :func:`lesde.tracking.train_and_track` (resumable: run the same command again after
an interruption), then exports the small outputs beside this file:

- ``cifar10_resnet18_summary.npz``: step (T,), time (T,) (lr-scaled, step * lr), the metrics (T,),
  the logits of every tracked sample (T, M, K), labels / split / index (M,), the class-mean
  features and logits of the tracked train and test samples (T, K, p) and (T, K, K), and the
  measured impacts (impact_step, impact_time (T',), E (T', K, K), alpha, beta (T',));
- ``cifar10_resnet18_metrics.csv``: step, time and the four metrics;
- ``cifar10_resnet18_impacts.csv``: step, time, alpha_hat, beta_hat and E_hat's entries;
- ``cifar10_resnet18_config.json``: the run's TrainConfig;
- ``cifar10_resnet18_logits.png``: class-mean logits over training, accuracy and loss, and the
  measured alpha_hat(t) vs beta_hat(t).

Usage (from the repository root, CIFAR-10 location in ``LESDE_CIFAR10``)::

    OMP_NUM_THREADS=1 python figures/real/cifar10_resnet18.py [--store runs/cifar10_resnet18]
        [--epochs 20] [--export-only]
    python figures/real/cifar10_resnet18.py --figure-only   # redraw the figure, no training
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ("airplane", "automobile", "bird")


def make_config(epochs: float):
    """The run's configuration (K = 3, 2,500 train images per class, batch 128)."""
    from lesde.tracking import TrainConfig

    return TrainConfig(
        net="resnet18", num_classes=3, net_kwargs={"width": 0.25},
        optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=5e-4, batch_size=128,
        epochs=epochs, log_every=8, track_per_class=100, track_test_per_class=100,
        eval_train_size=600, eval_test_size=600, eval_batch_size=200, seed=0,
        dtype="float32", device="cpu", checkpoint_every=58, impacts_every=120,
        impacts_per_class=30, impacts_output="logits", class_names=CLASSES,
    )


def train(store: str, epochs: float) -> None:
    import torch

    from lesde.data import load_cifar10
    from lesde.tracking import train_and_track

    path = os.environ.get("LESDE_CIFAR10")
    if not path:
        raise SystemExit("set LESDE_CIFAR10 to the CIFAR-10 zip, image folder or batches dir")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tr = load_cifar10(path, "train", classes=CLASSES, per_class=2500, seed=0, as_tensor=True)
    te = load_cifar10(path, "test", classes=CLASSES, as_tensor=True)
    train_and_track(make_config(epochs), tr, te, store, progress=True)


def export(store_path: str) -> None:
    from lesde.tracking import load_store

    st = load_store(store_path)
    cfg = st.config
    met = st.metrics()
    out = dict(met)
    out.update(logits=st.array("logits").astype(np.float32), labels=st.labels, split=st.split,
               index=st.index, class_names=np.array(st.class_names))
    for split in ("train", "test"):
        out[f"class_mean_logits_{split}"] = st.class_means("logits", split)
        out[f"class_mean_features_{split}"] = st.class_means("features", split)
    if cfg.impacts_every:
        imp = st.impacts()
        out.update(impact_step=imp["step"], impact_time=imp["time"], E=imp["E"],
                   alpha=imp["alpha"], beta=imp["beta"])
    np.savez_compressed(os.path.join(HERE, "cifar10_resnet18_summary.npz"), **out)
    with open(os.path.join(HERE, "cifar10_resnet18_config.json"), "w") as fh:
        fh.write(json.dumps(cfg.to_dict(), indent=1, sort_keys=True) + "\n")
    names = ("step", "time", "train_loss", "train_acc", "test_loss", "test_acc")
    with open(os.path.join(HERE, "cifar10_resnet18_metrics.csv"), "w") as fh:
        fh.write(",".join(names) + "\n")
        for row in zip(*(met[n] for n in names)):
            fh.write(f"{row[0]:d},{row[1]:.6g}," + ",".join(f"{v:.6g}" for v in row[2:]) + "\n")
    if cfg.impacts_every:
        k = cfg.num_classes
        with open(os.path.join(HERE, "cifar10_resnet18_impacts.csv"), "w") as fh:
            fh.write("step,time,alpha_hat,beta_hat,"
                     + ",".join(f"E_{a}{b}" for a in range(k) for b in range(k)) + "\n")
            for s, t, a, b, e in zip(imp["step"], imp["time"], imp["alpha"], imp["beta"],
                                     imp["E"]):
                fh.write(f"{s:d},{t:.6g},{a:.6g},{b:.6g},"
                         + ",".join(f"{v:.6g}" for v in e.ravel()) + "\n")
    redraw()
    print(f"T={len(st)} final step {met['step'][-1]}: train_acc {met['train_acc'][-1]:.4f} "
          f"test_acc {met['test_acc'][-1]:.4f} train_loss {met['train_loss'][-1]:.4f} "
          f"test_loss {met['test_loss'][-1]:.4f}")


def _figure(summary, config: dict, path: str, formats=None) -> list:
    """Class-mean logits, accuracy, loss and the measured impacts, drawn from the exported
    summary (``cifar10_resnet18_summary.npz`` as a mapping) and the TrainConfig dict, in the
    package's style (:mod:`lesde.plotting`)."""
    from matplotlib.lines import Line2D

    from lesde.plotting import color, legend_outside, new_figure, save_figure, style

    names = [str(c) for c in summary["class_names"]]
    K = len(names)
    t = np.asarray(summary["time"], dtype=float)
    cm_tr, cm_te = summary["class_mean_logits_train"], summary["class_mean_logits_test"]
    with style():
        fig = new_figure(7.2, 4.9)
        axes = fig.subplots(2, 3)
        for k, ax in enumerate(axes[0]):
            for j in range(K):
                ax.plot(t, cm_tr[:, k, j], color=color(j), lw=1.4)
                ax.plot(t, cm_te[:, k, j], color=color(j), lw=1.0, ls="--")
            ax.set_title(f"the {names[k]} images")
            ax.axhline(0, color="0.6", lw=0.5)
            ax.set_ylabel("class-mean logit")
        ax = axes[1, 0]
        ax.plot(t, summary["train_acc"], color="0.15", lw=1.4)
        ax.plot(t, summary["test_acc"], color="0.15", lw=1.0, ls="--")
        ax.axhline(1 / K, color="0.5", lw=0.8, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set(title="accuracy (600 fixed images each)", ylabel="accuracy")
        ax = axes[1, 1]
        ax.plot(t, summary["train_loss"], color="0.15", lw=1.4)
        ax.plot(t, summary["test_loss"], color="0.15", lw=1.0, ls="--")
        ax.axhline(np.log(K), color="0.5", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set(title="cross-entropy loss", ylabel="loss (nats)")
        ax = axes[1, 2]
        if "alpha" in summary:
            ax.plot(summary["impact_time"], summary["alpha"], "o-", color=color(3), ms=3)
            ax.plot(summary["impact_time"], summary["beta"], "s--", color=color(4), ms=3)
            ax.set_yscale("log")
            ax.set(title=f"impacts measured on the network\n(logits, "
                   f"{config['impacts_per_class']} images per class)",
                   ylabel=r"impact per unit $t$")
        else:
            ax.set_axis_off()
        for ax in axes.ravel():
            ax.set_xlabel(r"time $t$ (steps $\times$ lr)")
        handles = [Line2D([], [], color=color(j), lw=1.4, label=f"logit of {names[j]}")
                   for j in range(K)]
        handles += [Line2D([], [], color="0.15", lw=1.4, label="train (tracked / fixed images)"),
                    Line2D([], [], color="0.15", lw=1.0, ls="--", label="test"),
                    Line2D([], [], color="0.5", lw=0.8, ls=":", label=f"chance (1/{K}, log {K})")]
        if "alpha" in summary:
            handles += [Line2D([], [], color=color(3), marker="o", ms=3, label=r"$\hat\alpha$ (intra-class)"),
                        Line2D([], [], color=color(4), marker="s", ms=3, ls="--",
                               label=r"$\hat\beta$ (inter-class)")]
        legend_outside(fig, handles, where="bottom", ncol=4)
        width = config.get("net_kwargs", {}).get("width", 1)
        fig.suptitle(f"CIFAR-10 {', '.join(names)}: ResNet-18 (width {width:g}), SGD lr "
                     f"{config['lr']:g}, momentum {config['momentum']:g},\nbatch "
                     f"{config['batch_size']}; {config['track_per_class']} tracked train images "
                     "per class")
        return save_figure(fig, path, formats)


def redraw(formats=("png", "pdf", "svg")) -> list:
    """The figure again from the committed summary and config (no store, no training)."""
    summary = dict(np.load(os.path.join(HERE, "cifar10_resnet18_summary.npz")))
    with open(os.path.join(HERE, "cifar10_resnet18_config.json")) as fh:
        config = json.load(fh)
    return _figure(summary, config, os.path.join(HERE, "cifar10_resnet18_logits.png"), formats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=os.path.join("runs", "cifar10_resnet18"))
    p.add_argument("--epochs", type=float, default=20.0)
    p.add_argument("--export-only", action="store_true")
    p.add_argument("--figure-only", action="store_true",
                   help="redraw cifar10_resnet18_logits.png from the committed summary (no store)")
    args = p.parse_args()
    if args.figure_only:
        for path in redraw():
            print(f"wrote {os.path.relpath(path)}")
        return
    if not args.export_only:
        train(args.store, args.epochs)
    export(args.store)


if __name__ == "__main__":
    main()
