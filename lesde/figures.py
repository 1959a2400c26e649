"""Figures. Every function reads results (Solutions, tables, arrays) and writes one PNG.

Nothing here simulates or trains; the command line runs the jobs and calls these.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["class_mean_plane", "plot_demo", "plot_sgd_vs_sde", "training_loss_curve",
           "plot_torus_locality", "plot_matrix", "plot_elasticity_tracking"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt


def _save(fig, path) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def class_mean_plane(means: np.ndarray):
    """Origin (p,) and orthonormal basis (p, 2) of the plane through the class means
    (K, p): the top two principal directions of the centred means."""
    means = np.asarray(means, dtype=float)
    centre = means.mean(0)
    _, _, vt = np.linalg.svd(means - centre, full_matrices=False)
    basis = vt[:2].T
    if basis.shape[1] < 2:
        basis = np.concatenate([basis, np.zeros((means.shape[1], 2 - basis.shape[1]))], 1)
    return centre, basis


def training_loss_curve(states: np.ndarray, labels: np.ndarray):
    """Cross-entropy and argmax accuracy of logit features over time: states (T, B, N, K) ->
    loss (T, B), accuracy (T, B)."""
    from .metrics import argmax_accuracy, cross_entropy

    return np.asarray(cross_entropy(states, labels)), np.asarray(argmax_accuracy(states, labels))


_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf"]


def plot_demo(cases: Dict[str, "object"], path, run: int = 0) -> str:
    """Side by side, one column per case (title -> Solution with full states, logit features):
    top, class-mean trajectories (minus the grand mean at each time) in the plane of the final
    class means, with the triangle of the means at a few times; bottom, the samples at the start
    and the end projected on the same plane. Titles carry the final training loss and accuracy of the logits."""
    plt = _plt()
    fig, axes = plt.subplots(2, len(cases), figsize=(4.6 * len(cases), 8.4), squeeze=False)
    for col, (title, sol) in enumerate(cases.items()):
        y = sol.labels
        K = int(y.max()) + 1
        # relative to the grand mean at each time: a common translation (all samples moved
        # alike, as under E = 11^T) is not separation
        grand = sol.class_means[:, run].mean(1, keepdims=True)  # (T, 1, p)
        means = sol.class_means[:, run] - grand                 # (T, K, p)
        finite = np.isfinite(means).all((1, 2))
        last = int(np.flatnonzero(finite)[-1])
        centre, basis = class_mean_plane(means[last])
        centre = np.zeros_like(centre)
        proj = means[: last + 1] @ basis                        # (T, K, 2)
        ax = axes[0, col]
        for k in range(K):
            ax.plot(proj[:, k, 0], proj[:, k, 1], color=_PALETTE[k % 10], lw=1.8, label=f"class {k}")
            ax.scatter(proj[-1, k, 0], proj[-1, k, 1], color=_PALETTE[k % 10], s=30, zorder=3)
        for i in np.unique(np.linspace(0, last, 6).astype(int)):
            tri = np.concatenate([proj[i], proj[i][:1]])
            ax.plot(tri[:, 0], tri[:, 1], color="0.4", lw=0.7, alpha=0.35 + 0.65 * i / max(last, 1))
        loss, acc = training_loss_curve(sol.states[last:last + 1, run:run + 1], y)
        ax.set_title(f"{title}\nclass means minus grand mean, t = 0..{sol.ts[last]:g}; final loss {float(loss[0, 0]):.3g}, "
                     f"acc {float(acc[0, 0]):.2f}", fontsize=9)
        ax.set_xlabel("plane of the class means, axis 1")
        ax.set_ylabel("axis 2")
        ax.legend(fontsize=8, loc="best")
        ax = axes[1, col]
        for i, alpha in zip((0, last), (0.25, 0.8)):
            pts = (sol.states[i, run] - grand[i]) @ basis
            for k in range(K):
                sel = y == k
                ax.scatter(pts[sel, 0], pts[sel, 1], s=9, color=_PALETTE[k % 10], alpha=alpha,
                           edgecolors="none", label=(f"class {k}, t = {sol.ts[i]:g}" if i == last else None))
        ax.set_title(f"samples minus grand mean, t = 0 (faint) and t = {sol.ts[last]:g}", fontsize=9)
        ax.set_xlabel("plane of the class means, axis 1")
        ax.set_ylabel("axis 2")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_sgd_vs_sde(results: Sequence[dict], path) -> str:
    """Discrete feature SGD against its SDE for several learning rates h.

    ``results``: one dict per h with keys ``h``, ``ts``, ``disc_coord`` / ``sde_coord``
    (T, R) a class-mean coordinate over runs, ``disc_loss`` / ``sde_loss`` (T, R) training
    cross-entropy over runs. Left: the coordinate (mean and 5-95% band); right: the loss."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for c, r in zip(colors, results):
        for key, ls, lab in (("disc", "-", "feature SGD"), ("sde", "--", "SDE")):
            for ax, what in zip(axes, ("coord", "loss")):
                v = np.asarray(r[f"{key}_{what}"])
                ax.plot(r["ts"], np.nanmean(v, 1), ls, color=c, lw=1.6, label=f"{lab}, h = {r['h']:g}")
                lo, hi = np.nanpercentile(v, [5, 95], axis=1)
                ax.fill_between(r["ts"], lo, hi, color=c, alpha=0.08 if key == "sde" else 0.15, lw=0)
    axes[0].set_title("label coordinate of the class-0 mean (mean, 5-95% band over runs)", fontsize=9)
    axes[0].set_xlabel("time t = steps x h")
    axes[1].set_title("training cross-entropy of the logits (order parameter)", fontsize=9)
    axes[1].set_xlabel("time t = steps x h")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_torus_locality(results: dict, path) -> str:
    """S_rel against geodesic distance along the torus curves, one panel per network
    (name -> ``lesde.elasticity.LocalityResult``), with the Pearson correlation."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), sharey=False, squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        ax.scatter(np.asarray(r.distance), np.asarray(r.s_rel), s=2, alpha=0.3)
        ax.set_title(f"{name} MLP: Pearson {r.pearson:+.2f}", fontsize=9)
        ax.set_xlabel("geodesic distance along the curve")
        ax.set_ylabel("S_rel(x, x')")
    fig.tight_layout()
    return _save(fig, path)


def plot_matrix(S: np.ndarray, title: str, path) -> str:
    """A pairwise similarity matrix as an image (row = update example, column = probe)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.3))
    im = ax.imshow(np.asarray(S), cmap="viridis")
    fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=9)
    ax.grid(False)
    return _save(fig, path)


def plot_elasticity_tracking(frame, classes, path) -> str:
    """Dan et al.'s protocol: S_rel (KL, top; norm ratio, bottom) for each update class
    (columns) against every probe class, over epochs. ``frame`` has columns ``epoch`` and
    ``{kl,norm}_{a}_{b}``."""
    plt = _plt()
    K = len(classes)
    fig, axes = plt.subplots(2, K, figsize=(4 * K, 6), squeeze=False)
    for row, m in enumerate(("kl", "norm")):
        for a in range(K):
            ax = axes[row, a]
            for b in range(K):
                ax.plot(frame["epoch"], frame[f"{m}_{a}_{b}"], lw=2 if a == b else 1,
                        label=f"probe {classes[b]}" + (" (same class)" if a == b else ""))
            ax.set_title(f"S_rel ({'KL' if m == 'kl' else 'norm ratio'}), update class {classes[a]}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
