"""Figures. Every function reads results (Solutions, tables, arrays) and writes one figure.

Nothing here simulates or trains; the command line runs the jobs and calls these. Every figure
(theory, fits, real runs, local elasticity) is drawn in the package's style
(:mod:`lesde.plotting`) and takes ``formats`` for the files written beside ``path``: the theory,
fit and protocol figures write further formats only when asked (e.g. ``("pdf", "svg")``), the
elasticity figures write PNG, PDF and SVG unless told otherwise.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np

from .plotting import (FORMATS, FULL_WIDTH, band, color, legend_outside, mathify, new_figure,
                       save_figure, shared_colorbar, styled)

__all__ = ["class_mean_plane", "plot_demo", "plot_sgd_vs_sde", "training_loss_curve",
           "plot_phase", "plot_neural_collapse", "plot_feature_clouds",
           "plot_torus_locality", "plot_matrix", "plot_elasticity_tracking", "plot_fit",
           "plot_tracking_statistics", "plot_dan_comparison", "plot_torus_profiles",
           "plot_clustering_summary",
           "plot_goodness_of_fit", "plot_protocol_summary"]


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


@styled
def plot_demo(cases: Dict[str, "object"], path, run: int = 0, formats: Optional[Sequence[str]] = None,
              title: Optional[str] = None) -> str:
    """Side by side, one column per case (title -> Solution with full states, logit features):
    top, class-mean trajectories (minus the grand mean at each time) in the plane of the final
    class means, with the triangle of the means at a few times; bottom, the samples at the start
    (open) and the end (filled) projected on the same plane, on one scale for all cases. Titles
    carry the final training loss and accuracy of the logits.

    ``formats``: further formats written beside ``path`` (``("pdf", "svg")``); returns ``path``.
    """
    from matplotlib.lines import Line2D

    fig = new_figure(FULL_WIDTH, 6.6)
    ncol = len(cases)
    axes = np.empty((2, ncol), dtype=object)
    for col in range(ncol):
        axes[0, col] = fig.add_subplot(2, ncol, col + 1)
        axes[1, col] = fig.add_subplot(2, ncol, ncol + col + 1,
                                       sharex=axes[1, 0] if col else None,
                                       sharey=axes[1, 0] if col else None)
    K = 0
    for col, (name, sol) in enumerate(cases.items()):
        y = sol.labels
        K = max(K, int(y.max()) + 1)
        # relative to the grand mean at each time: a common translation (all samples moved
        # alike, as under E = 11^T) is not separation
        grand = sol.class_means[:, run].mean(1, keepdims=True)  # (T, 1, p)
        means = sol.class_means[:, run] - grand                 # (T, K, p)
        finite = np.isfinite(means).all((1, 2))
        last = int(np.flatnonzero(finite)[-1])
        _, basis = class_mean_plane(means[last])
        proj = means[: last + 1] @ basis                        # (T, K, 2)
        ax = axes[0, col]
        for i in np.unique(np.linspace(0, last, 6).astype(int)):
            tri = np.concatenate([proj[i], proj[i][:1]])
            ax.plot(tri[:, 0], tri[:, 1], color="0.45", lw=0.6, alpha=0.3 + 0.6 * i / max(last, 1), zorder=1)
        for k in range(proj.shape[1]):
            ax.plot(proj[:, k, 0], proj[:, k, 1], color=color(k), lw=1.5, zorder=2)
            ax.plot(proj[-1, k, 0], proj[-1, k, 1], "o", color=color(k), ms=5, zorder=3)
        loss, acc = training_loss_curve(sol.states[last:last + 1, run:run + 1], y)
        ax.set_title(f"{mathify(name)}\nfinal loss {float(loss[0, 0]):.3g}, accuracy "
                     f"{float(acc[0, 0]):.2f}")
        ax.set_xlabel("class-mean plane, axis 1")
        ax.set_ylabel("class-mean plane, axis 2")
        ax = axes[1, col]
        for i, filled in ((0, False), (last, True)):
            pts = (sol.states[i, run] - grand[i]) @ basis
            for k in range(proj.shape[1]):
                sel = y == k
                if filled:
                    ax.scatter(pts[sel, 0], pts[sel, 1], s=8, color=color(k), alpha=0.85,
                               edgecolors="none", zorder=3)
                else:
                    ax.scatter(pts[sel, 0], pts[sel, 1], s=8, facecolors="none",
                               edgecolors=color(k), linewidths=0.5, alpha=0.45, zorder=2)
        ax.set_title(f"samples at $t = 0$ (open) and $t = {sol.ts[last]:g}$ (filled)")
        ax.set_xlabel("class-mean plane, axis 1")
        ax.set_ylabel("class-mean plane, axis 2")
    handles = [Line2D([], [], color=color(k), lw=1.5, marker="o", ms=4, label=f"class {k}")
               for k in range(K)]
    handles.append(Line2D([], [], color="0.45", lw=0.8, label="triangle of the class means\n"
                          "at six times (darker: later)"))
    legend_outside(fig, handles, where="bottom", ncol=K + 1)
    fig.suptitle(title or "Class means (top) and samples (bottom) relative to the grand mean")
    return save_figure(fig, path, formats)[0]


@styled
def plot_sgd_vs_sde(results: Sequence[dict], path, formats: Optional[Sequence[str]] = None,
                    title: Optional[str] = None) -> str:
    """Discrete feature SGD against its SDE for several learning rates h.

    ``results``: one dict per h with keys ``h``, ``ts``, ``disc_coord`` / ``sde_coord``
    (T, R) a class-mean coordinate over runs, ``disc_loss`` / ``sde_loss`` (T, R) training
    cross-entropy over runs. One column per h; top: the coordinate, bottom: the loss, each as
    the mean over runs and the 5-95% band (feature SGD filled, SDE hatched).

    ``formats``: further formats written beside ``path``; returns ``path``.
    """
    from matplotlib.lines import Line2D

    fig = new_figure(FULL_WIDTH, 4.9)
    axes = fig.subplots(2, len(results), squeeze=False, sharex="col", sharey="row")
    handles = []
    for c, r in enumerate(results):
        ts = np.asarray(r["ts"], dtype=float)
        for row, what in enumerate(("coord", "loss")):
            ax = axes[row, c]
            for i, (key, kind, ls, lab) in enumerate((("disc", "fill", "-", "feature SGD"),
                                                      ("sde", "hatch", "--", "SDE"))):
                v = np.asarray(r[f"{key}_{what}"], dtype=float)
                lo, hi = np.nanpercentile(v, [5, 95], axis=1)
                h = band(ax, ts, lo, hi, color(i), kind=kind, label=f"{lab}: 5-95% of runs")
                ax.plot(ts, np.nanmean(v, 1), ls, color=color(i), lw=1.5, zorder=3)
                if c == 0 and row == 0:
                    handles += [Line2D([], [], color=color(i), ls=ls, lw=1.5,
                                       label=f"{lab}: mean over runs"), h]
        axes[0, c].set_title(f"learning rate $h = {r['h']:g}$")
        axes[1, c].set_xlabel(r"time $t$ = steps $\times\, h$")
    axes[1, 0].set_yscale("log")
    axes[0, 0].set_ylabel("class-0 mean along\n" + r"$d_0 = e_0 - \mathbf{1}/K$")
    axes[1, 0].set_ylabel("training cross-entropy\nof the logits")
    legend_outside(fig, handles, where="bottom", ncol=4)
    fig.suptitle(title or "Discrete feature SGD and its SDE")
    return save_figure(fig, path, formats)[0]


# --------------------------------------------------------------------------------------------
# local elasticity (lesde.elasticity, `lesde elasticity`)
# --------------------------------------------------------------------------------------------
_ACTIVATION_WORDS = {"relu": "ReLU", "tanh": "tanh", "elephant": "elephant",
                     "elephant_spread": "elephant, spread biases", "linear": "no activation",
                     "none": "no activation"}

# primes are typed as the Unicode prime (U+2032): mathtext's ' needs fonts not installed everywhere
_S_REL = r"$S_{\mathrm{rel}}$"
_S_KER = r"$S_{\mathrm{ker}}$"

#: the tracking measures of :func:`lesde.elasticity.class_elasticity` in words: (name, formula)
_MEASURE_WORDS = {
    "kl": ("KL ratio", r"$\mathrm{KL}(g(x′)\,\|\,g_+(x′))\,/\,\mathrm{KL}(g(x)\,\|\,g_+(x))$, "
           r"$g$ the softmax"),
    "kl_compat": ("KL ratio, Dan et al.'s released formula", ""),
    "norm": ("logit-change ratio", r"$\|\Delta z(x′)\|\,/\,\|\Delta z(x)\|$, $z$ the logits"),
    "norm_prob": ("probability-change ratio",
                  r"$\|\Delta p(x′)\|\,/\,\|\Delta p(x)\|$, $p$ the softmax probabilities"),
    "suhe_compat": ("probability-change ratio, Dan et al.'s released formula",
                    r"$\mathrm{mean}_c\,|\Delta p_c(x′)|\,/\,\mathrm{rms}_c\,\Delta p_c(x)$"),
}
#: Dan et al.'s released curves by the name of their definition
_REFERENCE_WORDS = {"kl": "their KL-ratio curves", "suhe": "their probability-ratio curves"}

#: the locality statistics of :func:`lesde.elasticity.locality_statistics`: (column key of
#: tracking_statistics, key in a comparison table, title, y label, chance level; None: 1/K)
_STATISTICS = (
    ("frac_same_exceeds", "frac", "same-class $S$ above every cross-class $S$",
     "fraction of classes", None),
    ("ratio", "ratio", "same-class over cross-class mean", "ratio", 1.0),
    ("double_log_ratio", "dlr", "double log-ratio (row, column effects cancel)",
     "mean$_{k<l}$ of\n" r"$\log(S_{kk}S_{ll}\,/\,S_{kl}S_{lk})$", 0.0),
)

_CLUSTER_METHOD_WORDS = {"kmeans_rel": "K-means on " + _S_REL,
                         "spectral_rel": "spectral on " + _S_REL,
                         "kernel_kmeans_ker": "kernel K-means on " + _S_KER,
                         "kmeans_raw": "K-means on the pixels",
                         "pca_kmeans": "PCA + K-means on the pixels"}
_CLUSTER_OUTPUT_WORDS = {"logits": "logit", "probabilities": "prob."}
_CLUSTER_KIND_WORDS = {"NTK": "closed-form NTK of the width", "init NTK": "exact NTK at initialisation",
                       "": "trained"}


def _activation_words(name) -> str:
    """'elephant_spread' -> 'elephant, spread biases'; unknown names unchanged."""
    return _ACTIVATION_WORDS.get(str(name), str(name))


def _network_parts(network, width):
    """A clustering table's network and width in words: (activation, width, kind), e.g.
    ('relu (NTK)', 'inf') -> ('ReLU', '$m \\to \\infty$', 'closed-form NTK of the width');
    ('tanh (init NTK)', '512') -> ('tanh', '$m$ = 512', 'exact NTK at initialisation');
    ('relu', '16') -> ('ReLU', '$m$ = 16', 'trained')."""
    network, width = str(network), str(width)
    base, _, kind = network.partition(" (")
    kind = kind.rstrip(")")
    try:
        w = float(width)
    except ValueError:
        w = float("nan")
    if math.isinf(w):
        size = r"$m \to \infty$"
    elif math.isfinite(w):
        size = f"$m$ = {int(w):,}" if w == int(w) else f"$m$ = {w:g}"
    else:
        size = f"$m$ = {width}"
    return _activation_words(base), size, _CLUSTER_KIND_WORDS.get(kind, kind)


def _measure_words(measure, formula: bool = False) -> str:
    name, tex = _MEASURE_WORDS.get(str(measure), (str(measure), ""))
    return f"{name}: {tex}" if formula and tex else name


def _pi_ticks(ax):
    """x ticks at 0, pi/4, ..., pi (a distance in radians)."""
    ax.set_xticks(np.linspace(0, np.pi, 5))
    ax.set_xticklabels(["0", r"$\pi/4$", r"$\pi/2$", r"$3\pi/4$", r"$\pi$"])
    ax.set_xlim(0, np.pi)


@styled
def plot_torus_locality(results: dict, path, *, formats: Optional[Sequence[str]] = FORMATS) -> str:
    """S_rel against geodesic distance along the torus curves, one panel per network
    (name -> ``lesde.elasticity.LocalityResult``), with the Pearson correlation (He & Su: a
    negative correlation is locality).

    ``formats``: the formats written (same stem as ``path``); returns ``path``."""
    n = len(results)
    fig = new_figure(FULL_WIDTH, 2.6)
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False, sharey=True)[0])
    for i, (ax, (name, r)) in enumerate(zip(axes, results.items())):
        ax.scatter(np.asarray(r.distance), np.asarray(r.s_rel), s=2, color=color(i), alpha=0.35,
                   edgecolors="none", rasterized=True)
        ax.set_title(f"{_activation_words(name)}\nPearson $r = {r.pearson:+.2f}$")
        ax.set_xlabel(r"distance $|\theta - \theta′|$ (rad)")
        _pi_ticks(ax)
    axes[0].set_ylabel(_S_REL + r"$(x, x′)$ of the logit")
    fig.suptitle("Relative similarity against the geodesic distance of two points of a torus curve "
                 "(same-class pairs $x \\neq x′$)")
    return save_figure(fig, path, formats)[0]


@styled
def plot_matrix(S: np.ndarray, title: str, path, *, formats: Optional[Sequence[str]] = FORMATS) -> str:
    """A pairwise similarity matrix as an image (row = update example, column = probe), with its
    colour bar. ``title``: code names of the similarity (``S_relative``, ``S_kernelized``,
    ``S_kl``) are typeset as symbols.

    ``formats``: the formats written (same stem as ``path``); returns ``path``."""
    S = np.asarray(S, dtype=float)
    fig = new_figure(FULL_WIDTH * 0.55, 3.4)
    ax = fig.subplots()
    im = ax.imshow(S, interpolation="nearest")
    ax.grid(False)
    ax.set_xlabel(r"probe example $x′$ (index)")
    ax.set_ylabel(r"update example $x$ (index)")
    text = str(title)
    for code, tex in (("S_relative", _S_REL), ("S_rel", _S_REL), ("S_kernelized", _S_KER),
                      ("S_ker", _S_KER), ("S_kl", r"$S_{\mathrm{rel}}^{\mathrm{KL}}$")):
        text = text.replace(code, tex)
    ax.set_title(text)
    shared_colorbar(fig, im, [ax], "similarity " + (text.split()[0] if text.startswith("$") else ""))
    return save_figure(fig, path, formats)[0]


@styled
def plot_elasticity_tracking(frame, classes, path, *,
                             formats: Optional[Sequence[str]] = FORMATS) -> str:
    """Dan et al.'s protocol: the class-pair mean relative similarity (KL ratio, top; logit-change
    ratio, bottom) of each update class (columns) towards every probe class, over epochs; the
    same-class curve is drawn thick. ``frame`` has columns ``epoch`` and ``{kl,norm}_{a}_{b}``
    (row a = update class, b = probe class).

    ``formats``: the formats written (same stem as ``path``); returns ``path``."""
    from matplotlib.lines import Line2D

    classes = [str(c) for c in classes]
    K = len(classes)
    measures = [m for m in ("kl", "norm") if f"{m}_0_0" in frame.columns]
    fig = new_figure(FULL_WIDTH, 1.9 * len(measures) + 0.9)
    axes = fig.subplots(len(measures), K, squeeze=False, sharex=True)
    ep = np.asarray(frame["epoch"], dtype=float)
    for row, m in enumerate(measures):
        for a in range(K):
            ax = axes[row, a]
            for b in range(K):
                ax.plot(ep, frame[f"{m}_{a}_{b}"], color=color(b), lw=2.2 if a == b else 1.0,
                        zorder=3 if a == b else 2)
            if row == 0:
                ax.set_title(f"update on {classes[a]}")
            if row == len(measures) - 1:
                ax.set_xlabel("training epoch")
            ax.set_ylabel(_measure_words(m))
    handles = [Line2D([], [], color=color(b), lw=1.2, label=f"probe class {classes[b]}")
               for b in range(K)]
    handles.append(Line2D([], [], color="0.3", lw=2.2, label="probe of the update's class"))
    legend_outside(fig, handles, where="bottom", ncol=K + 1)
    fig.suptitle("Relative similarity of one update step towards the probes of each class "
                 "(class-pair means), one run")
    return save_figure(fig, path, formats)[0]


@styled
def plot_torus_profiles(profiles: dict, edges, path, *,
                        formats: Optional[Sequence[str]] = FORMATS) -> str:
    """Mean S_rel per geodesic-distance bin on the torus curves, one panel per network, at
    initialisation (dashed, filled band) and after training (solid, hatched band); mean over
    seeds with a +-1 sd band. ``profiles``: (network, steps) -> list of bin-mean arrays (one per
    seed).

    ``formats``: the formats written (same stem as ``path``); returns ``path``."""
    from matplotlib.lines import Line2D

    nets = list(dict.fromkeys(k[0] for k in profiles))
    steps_all = sorted(dict.fromkeys(k[1] for k in profiles))
    centres = 0.5 * (np.asarray(edges)[1:] + np.asarray(edges)[:-1])
    fig = new_figure(FULL_WIDTH, 2.7)
    axes = fig.subplots(1, len(nets), squeeze=False, sharey=True)[0]
    seeds = set()
    for ax, net in zip(axes, nets):
        for i, steps in enumerate(steps_all):
            vals = profiles.get((net, steps))
            if vals is None:
                continue
            v = np.asarray(vals, dtype=float)
            seeds.add(len(v))
            m = v.mean(0)
            sd = v.std(0, ddof=1) if len(v) > 1 else np.zeros_like(m)
            band(ax, centres, m - sd, m + sd, color(i), kind="fill" if i % 2 == 0 else "hatch")
            ax.plot(centres, m, "--" if steps == 0 else "-", color=color(i), marker="o", ms=3,
                    zorder=3)
        ax.set_title(_activation_words(net))
        ax.set_xlabel(r"distance $|\theta - \theta′|$ (rad)")
        _pi_ticks(ax)
    axes[0].set_ylabel(f"mean {_S_REL} of the logit\nin the distance bin")
    handles = [Line2D([], [], color=color(i), ls="--" if s == 0 else "-", marker="o", ms=3,
                      label="at initialisation" if s == 0 else f"after {s:,} SGD steps")
               for i, s in enumerate(steps_all)]
    n_seeds = "/".join(str(s) for s in sorted(seeds))
    handles.append(band(axes[0], [], [], [], "0.5", label=f"$\\pm 1$ sd over {n_seeds} seeds"))
    legend_outside(fig, handles, where="bottom", ncol=len(handles))
    fig.suptitle("Locality on the torus curves: relative similarity against the geodesic distance "
                 r"$|\theta - \theta′|$" "\nof two points of a curve, networks with one hidden layer")
    return save_figure(fig, path, formats)[0]


@styled
def plot_clustering_summary(summary, path, *, formats: Optional[Sequence[str]] = FORMATS) -> str:
    """He & Su's clustering scores, one panel per class pair: mean +- sd over seeds for each
    (network, width, output, method), coloured by activation (baselines black), marked by the
    output (logit: filled circle, probability: open square), beside the chance level of a
    class-blind labelling (grey: its mean to its 95% quantile). ``summary``: the
    ``clustering_summary.csv`` table.

    ``formats``: the formats written (same stem as ``path``); returns ``path``."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    pairs = list(dict.fromkeys(summary["pair"]))
    keys = list(dict.fromkeys((str(r.network), str(r.width), str(r.output), str(r.method))
                              for r in summary.itertuples()))
    baseline = {k: k[0] == "-" for k in keys}
    acts = list(dict.fromkeys(k[0].partition(" (")[0] for k in keys if not baseline[k]))
    colour = {a: color(i) for i, a in enumerate(acts)}
    parts = {k: _network_parts(k[0], k[1]) for k in keys if not baseline[k]}
    kinds = set(p[2] for p in parts.values())
    labels = []
    for k in keys:
        method = _CLUSTER_METHOD_WORDS.get(k[3], k[3])
        if baseline[k]:
            labels.append(f"baseline: {method}")
            continue
        act, size, kind = parts[k]
        out = _CLUSTER_OUTPUT_WORDS.get(k[2], k[2])
        labels.append(f"{act}, {size}" + (f" ({kind})" if len(kinds) > 1 else "") + f", {out}: {method}")
    ncol = 2 if len(pairs) > 1 else 1
    nrow = math.ceil(len(pairs) / ncol)
    fig = new_figure(FULL_WIDTH, nrow * (0.125 * len(keys) + 0.55) + 0.9)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True)
    seeds = set()
    for i, pair in enumerate(pairs):
        ax = axes[i // ncol, i % ncol]
        t = summary[summary["pair"] == pair]
        lookup = {(str(r.network), str(r.width), str(r.output), str(r.method)): r
                  for r in t.itertuples()}
        ax.axvspan(float(t["chance_mean"].iloc[0]), float(t["chance_q95"].iloc[0]), color="0.85",
                   lw=0, zorder=0)
        ax.axvline(float(t["chance_mean"].iloc[0]), color="0.45", lw=0.8, zorder=0.5)
        for y, k in enumerate(keys):
            r = lookup.get(k)
            if r is None:
                continue
            seeds.add(int(r.seeds))
            sd = 0.0 if r.accuracy_sd != r.accuracy_sd else float(r.accuracy_sd)
            c = "black" if baseline[k] else colour[k[0].partition(" (")[0]]
            prob = k[2] == "probabilities"
            ax.errorbar(float(r.accuracy_mean), y, xerr=sd, fmt="s" if prob else "o", ms=3.5,
                        color=c, mfc="white" if prob else c, mec=c, elinewidth=0.9, zorder=3)
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels(labels, fontsize=6.5)
        ax.set_ylim(len(keys) - 0.5, -0.5)   # the first configuration on top
        ax.grid(axis="y", visible=False)
        ax.set_title(str(pair).replace("-", " against "))
        ax.set_xlabel(r"score $0.5 + |\mathrm{accuracy} - 0.5|$")
    for j in range(len(pairs), nrow * ncol):
        axes[j // ncol, j % ncol].axis("off")
    handles = [Line2D([], [], ls="none", marker="o", ms=4, color=colour[a],
                      label=_activation_words(a)) for a in acts]
    if any(baseline.values()):
        handles.append(Line2D([], [], ls="none", marker="o", ms=4, color="black",
                              label="pixel baseline"))
    handles += [Line2D([], [], ls="none", marker="o", ms=4, color="0.4", label="of the logit"),
                Line2D([], [], ls="none", marker="s", ms=4, color="0.4", mfc="white",
                       label="of the probability"),
                Patch(facecolor="0.85", edgecolor="0.45", lw=0.8,
                      label="chance (class-blind split):\nmean to 95% quantile")]
    legend_outside(fig, handles, where="bottom", ncol=min(len(handles), 4))
    n_seeds = "/".join(str(s) for s in sorted(seeds))
    head = "Clustering two classes by the relative similarity of two-layer networks (He & Su)"
    if len(kinds) == 1:
        head += f", {next(iter(kinds))}"
    fig.suptitle(head + f":\nmean $\\pm$ sd over {n_seeds} seeds, $m$ the width; logit and "
                 "probability: the output whose change defines " + _S_REL)
    return save_figure(fig, path, formats)[0]


def _statistic_axes(fig, rows, titles):
    """One subfigure per row (its title: ``titles[row]``), three panels each, one per locality
    statistic; returns the [rows, 3] axes."""
    subs = np.atleast_1d(fig.subfigures(rows, 1))
    axes = np.empty((rows, 3), dtype=object)
    for r in range(rows):
        axs = subs[r].subplots(1, 3, sharex=True)
        subs[r].suptitle(titles[r], fontsize=8.5)
        for c, (_, _, head, ylab, _) in enumerate(_STATISTICS):
            axs[c].set_title(head, fontsize=7.5)
            axs[c].set_ylabel(ylab, fontsize=7.5)
            axs[c].set_xlabel("training epoch", fontsize=7.5)
            axes[r, c] = axs[c]
    return axes


@styled
def plot_tracking_statistics(frames, classes, path, measures=None, *,
                             formats: Optional[Sequence[str]] = FORMATS) -> str:
    """Locality statistics of tracking runs (``lesde.elasticity.tracking_statistics``) against
    epochs: one row per measure, columns = the fraction of update classes whose same-class
    S_rel exceeds both cross-class values, the same/cross ratio, the double log-ratio; mean
    over runs with a min-max band, and the chance level (1/K, 1, 0) as a dashed line.

    ``formats``: the formats written (same stem as ``path``); returns ``path``."""
    from matplotlib.lines import Line2D

    from .elasticity import TRACK_MEASURES, tracking_statistics

    measures = [m for m in (measures or TRACK_MEASURES) if f"{m}_0_0" in frames[0].columns]
    k = len(classes)
    fig = new_figure(FULL_WIDTH, 1.9 * len(measures) + 0.6)
    axes = _statistic_axes(fig, len(measures), [_measure_words(m, formula=True) for m in measures])
    for row, m in enumerate(measures):
        stats = [tracking_statistics(f, m) for f in frames]
        n = min(len(s) for s in stats)
        ep = stats[0]["epoch"].to_numpy()[:n]
        for col, (key, _, _, _, chance) in enumerate(_STATISTICS):
            ax = axes[row, col]
            v = np.stack([s[key].to_numpy()[:n] for s in stats])
            if len(frames) > 1:
                band(ax, ep, v.min(0), v.max(0), color(0))
            ax.plot(ep, v.mean(0), color=color(0), lw=1.5, marker="o", ms=2.5, zorder=3)
            ax.axhline(1.0 / k if chance is None else chance, ls="--", color="black", lw=0.9,
                       zorder=2)
    handles = [Line2D([], [], color=color(0), lw=1.5, marker="o", ms=2.5,
                      label=f"mean of {len(frames)} run{'s' if len(frames) > 1 else ''}")]
    if len(frames) > 1:
        handles.append(band(axes[0, 0], [], [], [], color(0), label="lowest to highest run"))
    handles.append(Line2D([], [], color="black", ls="--", lw=0.9,
                          label=f"chance (no locality): 1/{k}, 1, 0"))
    legend_outside(fig, handles, where="bottom", ncol=len(handles))
    fig.suptitle("Locality of one update step during training, classes " + ", ".join(map(str, classes)))
    return save_figure(fig, path, formats)[0]


@styled
def plot_dan_comparison(table, path, *, formats: Optional[Sequence[str]] = FORMATS) -> str:
    """This package's tracking runs against Dan et al.'s released curves, record by record
    (a table from ``lesde elasticity compare``): rows = (our measure, their definition),
    columns = fraction / ratio / double log-ratio; mean over runs with +-1 sd bands (ours
    filled, theirs hatched), chance dashed (1/3, 1, 0: the released curves have three classes).
    Where fewer of our runs reach a record (column ``runs_ours``) a dotted vertical line marks it.

    ``formats``: the formats written (same stem as ``path``); returns ``path``."""
    from matplotlib.lines import Line2D

    keys = list(dict.fromkeys(zip(table["ours"], table["reference"])))
    titles = []
    for ours, ref in keys:
        head = _measure_words(ours, formula=True)
        if str(ref) in _REFERENCE_WORDS:
            head += f"; against {_REFERENCE_WORDS[str(ref)]}"
        titles.append(head)
    fig = new_figure(FULL_WIDTH, 1.9 * len(keys) + 0.7)
    axes = _statistic_axes(fig, len(keys), titles)
    handles = {}
    for row, (ours, ref) in enumerate(keys):
        t = table[(table["ours"] == ours) & (table["reference"] == ref)]
        ep = t["epoch"].to_numpy(dtype=float)
        drops = []
        if "runs_ours" in t:
            runs = t["runs_ours"].to_numpy()
            drops = [(0.5 * (ep[i] + ep[i + 1]), runs[i + 1]) for i in range(len(runs) - 1)
                     if runs[i + 1] != runs[i]]
        for col, (_, name, _, _, chance) in enumerate(_STATISTICS):
            ax = axes[row, col]
            for i, (who, kind, label) in enumerate((
                    ("ours", "fill", "this package: mean $\\pm$ 1 sd over its runs"),
                    ("ref", "hatch", "Dan et al.'s released curves: mean $\\pm$ 1 sd"))):
                col_name = f"{name}_{who}"
                if col_name not in t or t[col_name].isna().all():
                    continue
                m = t[col_name].to_numpy(dtype=float)
                sd = t[f"{col_name}_sd"].to_numpy(dtype=float) if f"{col_name}_sd" in t \
                    else np.zeros_like(m)
                band(ax, ep, m - sd, m + sd, color(i), kind=kind)
                ax.plot(ep, m, color=color(i), lw=1.3, zorder=3)
                handles.setdefault(who, Line2D([], [], color=color(i), lw=1.3, label=label))
            ax.axhline(1.0 / 3.0 if chance is None else chance, ls="--", color="black", lw=0.9,
                       zorder=2)
            for x, _ in drops:
                ax.axvline(x, color="0.45", ls=":", lw=0.9, zorder=1)
            if name == "ratio":
                vals = t[[c for c in ("ratio_ours", "ratio_ref") if c in t]].to_numpy(dtype=float)
                vals = vals[np.isfinite(vals)]
                if vals.size and vals.min() > 0 and vals.max() / vals.min() > 20:
                    ax.set_yscale("log")
        if drops:
            handles.setdefault("drops", Line2D(
                [], [], color="0.45", ls=":", lw=0.9,
                label="from here on only " + ", then ".join(f"{n}" for _, n in drops)
                + " of our runs\n(the others did not reach these records)"))
    handles["chance"] = Line2D([], [], color="black", ls="--", lw=0.9,
                               label="chance (no locality): 1/3, 1, 0")
    legend_outside(fig, list(handles.values()), where="bottom", ncol=2)
    fig.suptitle("Locality during training: this package against Dan et al.'s released curves, "
                 "record by record")
    return save_figure(fig, path, formats)[0]


# --------------------------------------------------------------------------------------------
# phase sweeps, neural collapse, feature clouds (lesde.phase)
# --------------------------------------------------------------------------------------------
def _swept(table):
    """Names of the grid parameters with more than one value (from the table's spec)."""
    spec = table.attrs.get("spec", {})
    names = [name for name, vals in spec.get("grid", []) if len(vals) > 1]
    return [n for n in names if n in table.columns]


def _decay_boundary(spec: dict, T: float, c: float):
    """Heuristic boundary r*(T) of an I-model decay sweep: the centred class means grow like
    exp((A(T; r) - B(T; r))/K) from s0 = init_std sqrt(2/n), the within-class spread is
    w(T) = sqrt(init_std^2 + sigma^2 T); separation needs exp((A - B)/K) s0 = c w(T)."""
    from .model import PowerLaw

    rs = np.linspace(0.0, 3.0, 3001)
    K, n, s, sd, t0 = spec["K"], spec["n"], spec["sigma"], spec["init_std"], spec["t0"]
    grid = dict((k, v) for k, v in spec["grid"])
    key = [k for k in ("r", "r_alpha", "r_beta") if k in grid][0]
    ra = rs if key in ("r", "r_alpha") else np.full_like(rs, spec["r_alpha"])
    rb = rs if key in ("r", "r_beta") else np.full_like(rs, spec["r_beta"])
    a0 = grid.get("alpha", [spec["alpha"]])[0]
    b0 = grid.get("beta", [spec["beta"]])[0]
    gap = (PowerLaw(a0, ra, t0).integral(T) - PowerLaw(b0, rb, t0).integral(T)) / K
    need = np.log(c * np.sqrt(sd ** 2 + s ** 2 * T) / (sd * np.sqrt(2.0 / n)))
    ok = gap >= need
    if ok.all() or not ok.any():
        return None
    return float(rs[np.flatnonzero(np.diff(ok.astype(int)) != 0)[0] + 1])


_DRIFT_WORDS = {"cross_entropy": "cross-entropy drift", "identity": "identity drift (I-model)",
                "label_projection": "label-projection drift (L-model)"}
_NOTION_WORDS = {"readout accuracy 1": "read-out accuracy = 1",
                 "NCC accuracy 1": "nearest-class-centre accuracy = 1"}
_PARAM_LABELS = {"alpha": r"intra-class impact $\alpha$", "beta": r"inter-class impact $\beta$",
                 "gap": r"impact gap $\alpha - \beta$",
                 "r": r"decay exponent $r$ of $\alpha(t)$ and $\beta(t)$",
                 "r_alpha": r"decay exponent $r_\alpha$ of $\alpha(t)$",
                 "r_beta": r"decay exponent $r_\beta$ of $\beta(t)$",
                 "sigma": r"additive noise level $\sigma$", "init_std": r"initial spread $\sigma_0$",
                 "K": "number of classes $K$", "n": "samples per class $n$",
                 "lr": "learning rate $h$", "t0": r"decay time scale $t_0$"}
_VALUE_LABELS = {"p_sep": "P(separable at $T$)", "p_lp": "P(LP-separable at $T$)",
                 "p_loss": "P(training loss below threshold at $T$)",
                 "loss_mean": "training cross-entropy at $T$", "nc1_mean": "NC1 at $T$",
                 "t_sep_mean": "time to separation", "accuracy_mean": "argmax accuracy at $T$",
                 "ncc_accuracy_mean": "nearest-class-centre accuracy at $T$"}


def _sweep_description(spec: dict, swept) -> str:
    """The model of a sweep in words and symbols (its swept parameters left out)."""
    drift = _DRIFT_WORDS.get(spec.get("drift"), f"{spec.get('drift')} drift")
    noise = spec.get("noise")
    parts = []
    if noise in ("sgd", "both"):
        parts.append("SGD sampling noise" + ("" if "lr" in swept else f" ($h = {spec.get('lr'):g}$)"))
    if noise in ("additive", "both"):
        parts.append("additive noise" + ("" if "sigma" in swept else
                                         rf" ($\sigma = {spec.get('sigma'):g}$)"))
    if noise == "none":
        parts.append("no noise")
    if "noise" in swept:
        parts = ["noise as swept"]
    size = [f"$K = {spec.get('K')}$ classes" if "K" not in swept else "",
            f"$n = {spec.get('n')}$ per class" if "n" not in swept else ""]
    text = (drift[0].upper() + drift[1:] + ", " + " and ".join(parts) + "\n"
            + ", ".join(s for s in size if s) + f", {spec.get('replicates')} replicates per point"
            + (", co-moving frame" if spec.get("comoving") else ""))
    return text


def _schedule_tex(sym: str, a0: float, exponent: str, value: float, t0: float, swept: bool) -> str:
    """``alpha(t) = a0 (1 + t/t0)^(-r)`` in math text, simplified (0, constants, t0 = 1, a0 = 1)."""
    if a0 == 0:
        return f"${sym}(t) = 0$"
    if not swept and value == 0:
        return f"${sym}(t) = {a0:g}$"
    coef = "" if a0 == 1 else f"{a0:g}\\,"
    base = "(1 + t)" if t0 == 1 else f"(1 + t/{t0:g})"
    power = exponent if swept else f"{value:g}"
    return f"${sym}(t) = {coef}{base}^{{-{power}}}$"


@styled
def plot_phase(table, path, value: str = "p_sep", title: Optional[str] = None,
               theory_c: Optional[float] = None, formats: Optional[Sequence[str]] = None) -> str:
    """Draw a phase-sweep table (:func:`lesde.phase.run_sweep`), one panel per scoring time T.

    Two swept parameters: heat maps of ``value`` (first grid name on the x axis, the diagonal
    alpha = beta drawn when the axes are alpha and beta), one colour bar for all panels; with
    ``value="p_sep"`` a second row shows LP separability (any affine classifier, a weaker
    notion). One swept parameter: curves of ``value`` and of ``p_lp`` against it, one colour per
    T, with standard errors; a decay exponent on the x axis gets the line r = 1 and, with
    ``theory_c``, the heuristic boundary of :func:`_decay_boundary` per T (dotted).

    ``formats``: further formats written beside ``path``; returns ``path``."""
    from matplotlib.lines import Line2D

    names = _swept(table)
    times = sorted(table["T"].unique())
    notion = str(table["notion"].iloc[0]) if "notion" in table.columns else value
    notion = _NOTION_WORDS.get(notion, notion)
    spec = table.attrs.get("spec", {})
    desc = _sweep_description(spec, set(names))
    prob = value.startswith("p_")
    vlabel = _VALUE_LABELS.get(value, value)
    if len(names) == 2:
        xname, yname = names
        rows = [(value, f"order parameter: P({notion})" if value == "p_sep" else vlabel)]
        if value == "p_sep" and table["p_lp"].notna().any():
            rows.append(("p_lp", "weaker notion: P(LP-separable by any affine classifier)"))
        xs = np.sort(table[xname].unique())
        ys = np.sort(table[yname].unique())
        square = {xname, yname} == {"alpha", "beta"}
        width = FULL_WIDTH if len(times) > 1 else FULL_WIDTH * 0.55
        fig = new_figure(width, 2.55 * len(rows) + 1.0)
        subs = fig.subfigures(len(rows), 1, height_ratios=[1.0] * (len(rows) - 1) + [1.22])
        subs = np.atleast_1d(subs)
        vmin = vmax = None
        if not prob:
            vals = np.concatenate([table[c].to_numpy(dtype=float) for c, _ in rows])
            vmin, vmax = np.nanmin(vals), np.nanmax(vals)
        axes_all, im, diag = [], None, None
        dx = (xs[-1] - xs[0]) / max(len(xs) - 1, 1) / 2
        dy = (ys[-1] - ys[0]) / max(len(ys) - 1, 1) / 2
        for r, (col, lab) in enumerate(rows):
            axs = np.atleast_1d(subs[r].subplots(1, len(times), sharex=True, sharey=True))
            subs[r].suptitle(lab, fontsize=8.5)
            for c, T in enumerate(times):
                ax = axs[c]
                g = table[table["T"] == T].pivot_table(index=yname, columns=xname, values=col)
                g = g.reindex(index=ys, columns=xs)
                im = ax.imshow(g.to_numpy(), origin="lower", aspect="equal" if square else "auto",
                               interpolation="nearest",
                               extent=[xs[0] - dx, xs[-1] + dx, ys[0] - dy, ys[-1] + dy],
                               vmin=0 if prob else vmin, vmax=1 if prob else vmax)
                if square:
                    lo, hi = max(xs[0], ys[0]) - dx, min(xs[-1], ys[-1]) + dx
                    # white under black dashes: visible on dark and light colours alike
                    under, = ax.plot([lo, hi], [lo, hi], color="white", lw=2.2, zorder=2)
                    over, = ax.plot([lo, hi], [lo, hi], color="black", ls=(0, (3, 2)), lw=1.0, zorder=3)
                    diag = (under, over)
                ax.grid(False)
                ax.set_title(f"$T = {T:g}$")
                ax.set_xlabel(_PARAM_LABELS.get(xname, xname))
                if c == 0:
                    ax.set_ylabel(_PARAM_LABELS.get(yname, yname))
                axes_all.append(ax)
            last_axes = axs
        shared_colorbar(subs[-1], im, list(last_axes), "fraction of replicates" if prob else vlabel,
                        location="bottom", pad=0.02)
        if diag is not None:
            from matplotlib.legend_handler import HandlerTuple

            subs[-1].legend([diag], [r"$\alpha = \beta$"], loc="lower right", bbox_to_anchor=(1.0, 0.0),
                            handler_map={tuple: HandlerTuple(ndivide=None)}, handlelength=3)
        fig.suptitle(title or desc)
    elif len(names) == 1:
        xname = names[0]
        fig = new_figure(FULL_WIDTH, 4.4)
        ax = fig.subplots()
        handles = []
        for i, T in enumerate(times):
            g = table[table["T"] == T].sort_values(xname)
            ax.errorbar(g[xname], g[value], yerr=g.get(f"{value}_se"), color=color(i), lw=1.5,
                        marker="o", ms=3, zorder=3)
            handles.append(Line2D([], [], color=color(i), lw=1.5, marker="o", ms=3, label=f"$T = {T:g}$"))
            if value == "p_sep" and g["p_lp"].notna().any():
                ax.plot(g[xname], g["p_lp"], ls="--", color=color(i), lw=1, zorder=2)
            if theory_c is not None and xname in ("r", "r_alpha", "r_beta"):
                rstar = _decay_boundary(spec, T, theory_c)
                if rstar is not None:
                    ax.axvline(rstar, color=color(i), ls=":", lw=1.3, zorder=1)
        handles.append(Line2D([], [], color="0.2", lw=1.5, marker="o", ms=3,
                              label=f"order parameter: {notion}\n(bars: binomial standard error)"
                              if value == "p_sep" else vlabel))
        if value == "p_sep" and table["p_lp"].notna().any():
            handles.append(Line2D([], [], color="0.2", lw=1, ls="--",
                                  label="LP-separable by any affine\nclassifier (a weaker notion)"))
        if theory_c is not None and xname in ("r", "r_alpha", "r_beta"):
            handles.append(Line2D([], [], color="0.2", lw=1.3, ls=":",
                                  label="heuristic boundary\n"
                                  rf"$e^{{(A - B)/K}} s_0 = {theory_c:g}\, w(T)$"))
        if xname in ("r", "r_alpha", "r_beta"):
            ax.axvline(1.0, color="black", lw=0.9, zorder=1)
            handles.append(Line2D([], [], color="black", lw=0.9,
                                  label=r"$r = 1$: $A(t) = \int_0^t \alpha(s)\,ds$ diverges" "\n"
                                  r"iff $r \leq 1$"))
            grid = dict(spec.get("grid", []))
            a0 = grid.get("alpha", [spec.get("alpha")])[0]
            b0 = grid.get("beta", [spec.get("beta")])[0]
            t0 = spec.get("t0", 1.0)
            if xname == "r":
                ea, eb = ("r", True), ("r", True)
            else:
                ea = (r"r_\alpha", xname == "r_alpha")
                eb = (r"r_\beta", xname == "r_beta")
            desc += ("\n" + _schedule_tex(r"\alpha", a0, ea[0], spec.get("r_alpha", 0.0), t0, ea[1])
                     + ", " + _schedule_tex(r"\beta", b0, eb[0], spec.get("r_beta", 0.0), t0, eb[1]))
        ax.set_xlabel(_PARAM_LABELS.get(xname, xname))
        ax.set_ylabel(vlabel)
        if prob:
            ax.set_ylim(-0.04, 1.04)
        legend_outside(fig, handles, where="bottom", ncol=4)
        fig.suptitle(title or desc)
    else:
        raise ValueError(f"plot_phase draws sweeps over one or two parameters; this one sweeps {names}")
    return save_figure(fig, path, formats)[0]


_NC_PANELS = [
    ("nc1", "NC1: within-class variability", r"$\mathrm{Tr}(\Sigma_W \Sigma_B^+)/K$", True),
    ("etf_angle", "NC2: angles of a simplex ETF", r"mean $|\cos\theta_{kl} + 1/(K-1)|$", True),
    ("equinorm", "NC2: equal norms", r"CV of $\|\mu_k - \mu_G\|$", True),
    ("nc3", "NC3: self-duality with the read-out", r"$\|W^\top/\|W\| - M/\|M\|\|^2$", False),
    ("nc4", "NC4: nearest-class-centre rule", r"fraction argmax $\neq$ nearest mean", False),
    ("loss", "Training cross-entropy", "cross-entropy of the logits", True),
]


@styled
def plot_neural_collapse(summary, path, title: Optional[str] = None,
                         formats: Optional[Sequence[str]] = None) -> str:
    """NC1, NC2 (ETF angle, equinorm), NC3, NC4 and the training loss against time, one line per
    case. ``summary``: columns ``case``, ``t``, ``nc1``, ``etf_angle``, ``equinorm``,
    ``equiangularity``, ``nc3``, ``nc4``, ``loss`` (e.g. medians of
    :func:`lesde.phase.collapse_over_time` over runs). NC3 is measured against the centred
    identity read-out of the logits (Papyan, Han & Donoho, PNAS 2020).

    ``formats``: further formats written beside ``path``; returns ``path``."""
    fig = new_figure(FULL_WIDTH, 5.0)
    axes = fig.subplots(2, 3, sharex=True)
    for ax, (col, head, ylab, logy) in zip(axes.ravel(), _NC_PANELS):
        for i, (case, g) in enumerate(summary.groupby("case", sort=False)):
            g = g[g["t"] > 0]
            ax.plot(g["t"], g[col], color=color(i), lw=1.5, label=mathify(case))
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_title(head)
        ax.set_ylabel(ylab)
    for ax in axes[1]:
        ax.set_xlabel(r"time $t$ (steps $\times$ learning rate)")
    legend_outside(fig, where="bottom", ncol=4)
    if title:
        fig.suptitle(mathify(title))
    return save_figure(fig, path, formats)[0]


@styled
def plot_feature_clouds(cases: Dict[str, "object"], path, run: int = 0, subtitle: str = "",
                        formats: Optional[Sequence[str]] = None) -> str:
    """Feature clouds at every save time (columns) for each case (rows; title -> Solution with
    full states): samples minus the grand mean, projected on the plane of the class means at
    that time (:func:`class_mean_plane`); class means as large markers. Panel titles give the
    training loss and accuracy of the logits when p = K.

    ``formats``: further formats written beside ``path``; returns ``path``."""
    from matplotlib.lines import Line2D

    first = next(iter(cases.values()))
    T = first.ts.shape[0]
    fig = new_figure(FULL_WIDTH, 1.95 * len(cases) + 1.1)
    axes = fig.subplots(len(cases), T, squeeze=False)
    K = 0
    for r, (title, sol) in enumerate(cases.items()):
        y = sol.labels
        K = max(K, int(y.max()) + 1)
        for c in range(T):
            ax = axes[r, c]
            X = sol.states[c, run]
            if not np.isfinite(X).all():
                ax.set_title(f"$t = {sol.ts[c]:g}$: overflowed")
                continue
            means = sol.class_means[c, run]
            grand = means.mean(0)
            _, basis = class_mean_plane(means)
            pts = (X - grand) @ basis
            mp = (means - grand) @ basis
            for k in range(int(y.max()) + 1):
                sel = y == k
                ax.scatter(pts[sel, 0], pts[sel, 1], s=5, color=color(k), alpha=0.7,
                           edgecolors="none", zorder=2)
                ax.scatter(mp[k, 0], mp[k, 1], s=45, color=color(k), marker="X",
                           edgecolors="black", linewidths=0.6, zorder=3)
            extra = ""
            if X.shape[1] == K:
                loss, acc = training_loss_curve(X[None, None], y)
                extra = f"\nloss {float(loss[0, 0]):.3g}, accuracy {float(acc[0, 0]):.2f}"
            ax.set_title(f"$t = {sol.ts[c]:g}${extra}", fontsize=7.5)
            ax.set_aspect("equal", adjustable="datalim")
            ax.tick_params(labelsize=6.5)
        label = mathify(title).replace(": ", ":\n", 1)
        axes[r, 0].set_ylabel(label, fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("class-mean plane, axis 1", fontsize=7.5)
    handles = [Line2D([], [], ls="none", marker="o", ms=4, color=color(k), label=f"class {k}")
               for k in range(K)]
    handles.append(Line2D([], [], ls="none", marker="X", ms=7, color="0.6", mec="black", mew=0.6,
                          label="class mean"))
    legend_outside(fig, handles, where="bottom", ncol=K + 1)
    fig.suptitle("Samples minus the grand mean, projected on the plane of the class means"
                 + (f"\n{mathify(subtitle)}" if subtitle else ""))
    return save_figure(fig, path, formats)[0]


# --------------------------------------------------------------------------------------------
# fitted impacts and goodness of fit (lesde fit)
# --------------------------------------------------------------------------------------------
def _fit_curves(est) -> dict:
    """A fitted I/L/regression estimator (or a dict in the layout of its ``results()``) as a
    dict: t_AB, A, B (and A_lo/A_hi, B_lo/B_hi if known); t_ab, alpha, beta (and their bands)."""
    if isinstance(est, dict):
        d = {k: np.asarray(v, dtype=float) for k, v in est.items()}
        out = {"t_AB": d["t"], "t_ab": d["t"]}
        for k in ("A", "B", "alpha", "beta"):
            if k in d:
                out[k] = d[k]
            if f"{k}_lo" in d and f"{k}_hi" in d:
                out[f"{k}_lo"], out[f"{k}_hi"] = d[f"{k}_lo"], d[f"{k}_hi"]
        return out
    bands = getattr(est, "bands_", {}) or {}
    if hasattr(est, "window_times_"):                  # RegressionEstimator: per window
        out = {"t_AB": np.asarray(est.edge_times_), "A": est.A_, "B": est.B_,
               "t_ab": np.asarray(est.window_times_), "alpha": est.alpha_, "beta": est.beta_}
        for k in ("alpha", "beta"):
            band = bands.get(k)
            if band is None:
                band = getattr(est, f"{k}_ci_", None)
            if band is not None:
                out[f"{k}_lo"], out[f"{k}_hi"] = band[0], band[1]
        return out
    out = {"t_AB": np.asarray(est.ts_), "A": est.A_, "B": est.B_, "t_ab": np.asarray(est.ts_),
           "alpha": est.alpha_, "beta": est.beta_}
    for k in ("A", "B", "alpha", "beta"):
        if k in bands:
            out[f"{k}_lo"], out[f"{k}_hi"] = bands[k][0], bands[k][1]
    return out


_FIT_LABELS = {"i": "I-estimator", "l": "L-estimator", "regression": "regression",
               "shooting": "trajectory matching"}
_DEFAULT_TIME_UNIT = "t = step x lr"


def _time_label(time_unit: str) -> str:
    if time_unit == _DEFAULT_TIME_UNIT:
        return r"time $t$ (steps $\times$ learning rate)"
    return f"time ({mathify(time_unit)})"


@styled
def plot_fit(ts, estimates, measured: Optional[dict] = None, path="fit.png",
             title: Optional[str] = None, time_unit: str = "t = step x lr",
             formats: Optional[Sequence[str]] = None) -> str:
    r"""Fitted impacts of ``lesde fit``: A(t), B(t) and alpha(t), beta(t) of each estimator with
    its band, and the directly measured alpha_hat(t), beta_hat(t).

    The I- and L-estimators (and any fit with the identity or label-projection field) fit the
    impacts of the linear models; the trajectory-matching fit and the regression with the
    cross-entropy field fit those of that field: the numbers are in different units, so they get
    separate rows (top: A, B of the linear-model fits; middle: their alpha, beta; bottom: the
    cross-entropy fits' alpha, beta with the directly measured alpha_hat, beta_hat, which use the
    cross-entropy drift's normalisation). Rows without an estimator are left out; with no
    cross-entropy fit the measured values go on the linear-model rate axes.

    Args:
        ts: (T,) the logged lr-scaled times (sets the time axis).
        estimates: dict name -> fitted :class:`~lesde.fit.ShootingEstimator`,
            :class:`~lesde.fit.IEstimator`, :class:`~lesde.fit.LEstimator` or
            :class:`~lesde.fit.RegressionEstimator` (or a dict like their ``results()``; one
            with ``t_start`` is read as a regression's); names "shooting", "i", "l",
            "regression" get readable labels.
        measured: optional dict with ``time``, ``alpha``, ``beta`` (T',) arrays, e.g.
            ``store.impacts()``; drawn as open diamonds.
        path: output file (PNG unless its extension says otherwise).
        title: optional suptitle.
        time_unit: how the time axis is labelled.
        formats: further formats written beside ``path`` (e.g. ``("pdf", "svg")``).

    The alpha and beta axes of a row share one y-range (log scale when all values are
    positive and span more than a decade), so intra- and inter-class impacts can be compared.
    An estimator whose curve is undefined everywhere (e.g. an L-estimator whose modes turned
    against their start) is listed as "band only" rather than as a line that is not drawn.
    """
    from matplotlib.lines import Line2D

    ts = np.asarray(ts, dtype=float)

    def is_reg(est):
        """Impacts in the units of a non-linear field (cross-entropy): the regression's and the
        trajectory-matching fit's with such a field; the I/L fits and linear fields otherwise."""
        if isinstance(est, dict):
            return "t_start" in est
        fld = getattr(est, "field", None)
        if fld is None:
            return False
        name = fld if isinstance(fld, str) else getattr(fld, "name", "")
        return name.lower() not in ("identity", "i", "label_projection", "l")

    mode = {n: _fit_curves(e) for n, e in estimates.items() if not is_reg(e)}
    reg = {n: _fit_curves(e) for n, e in estimates.items() if is_reg(e)}
    rows = (["AB", "rates"] if mode else []) + (["reg"] if reg else [])
    if not rows:
        raise ValueError("plot_fit needs at least one fitted estimator")
    meas_row = "reg" if reg else "rates"
    fig = new_figure(FULL_WIDTH, 2.1 * len(rows) + 0.9)
    axes = fig.subplots(len(rows), 2, squeeze=False, sharex=True)
    colors = {n: color(i) for i, n in enumerate(estimates)}
    handles, gaps = {}, {}
    for r, row in enumerate(rows):
        group = reg if row == "reg" else mode
        keys = ("A", "B") if row == "AB" else ("alpha", "beta")
        tkey = "t_AB" if row == "AB" else "t_ab"
        vals = []
        for col, key in enumerate(keys):
            ax = axes[r, col]
            for name, c in group.items():
                if key not in c:
                    continue
                label = _FIT_LABELS.get(name, str(name))
                x, v = np.asarray(c[tkey], dtype=float), np.asarray(c[key], dtype=float)
                if f"{key}_lo" in c:
                    lo, hi = np.asarray(c[f"{key}_lo"], float), np.asarray(c[f"{key}_hi"], float)
                    h = band(ax, x, lo, hi, colors[name], kind="fill" if name != "l" else "hatch",
                             label=f"{label}: band")
                    handles.setdefault(f"{label}: band", h)
                    vals += [lo, hi]
                gaps[name] = gaps.get(name, False) or not np.isfinite(v).all()
                if np.isfinite(v).any():
                    marker = "o" if len(x) <= 40 else None
                    ax.plot(x, v, color=colors[name], lw=1.4, marker=marker, ms=2.5, zorder=3)
                    handles.setdefault(label, Line2D([], [], color=colors[name], lw=1.4,
                                                     marker=marker, ms=2.5, label=label))
                    vals.append(v)
            if measured is not None and row == meas_row:
                mv = np.asarray(measured[key], dtype=float)
                ax.plot(np.asarray(measured["time"], dtype=float), mv, ls="none", marker="D",
                        ms=4.5, mfc="none", mec="k", mew=1.0, zorder=4)
                handles.setdefault("measured", Line2D(
                    [], [], ls="none", marker="D", ms=4.5, mfc="none", mec="k", mew=1.0,
                    label=r"measured on the network ($\hat\alpha$, $\hat\beta$; first order)"))
                vals.append(mv)
            what = "cross-entropy drift" if row == "reg" else "linear (I/L) model"
            ylabel = {"A": r"$A(t) = \int_0^t \alpha\,ds$", "B": r"$B(t) = \int_0^t \beta\,ds$",
                      "alpha": r"$\alpha(t)$ per unit $t$", "beta": r"$\beta(t)$ per unit $t$"}[key]
            ax.set_ylabel(f"{ylabel}\n({what})")
            ax.set_title({"A": "integrated intra-class impact", "B": "integrated inter-class impact",
                          "alpha": "intra-class impact", "beta": "inter-class impact"}[key])
            if ts.size:
                ax.set_xlim(ts.min(), ts.max())
        if row != "AB":
            v = np.concatenate([np.ravel(x) for x in vals]) if vals else np.zeros(0)
            v = v[np.isfinite(v)]
            if v.size and v.min() > 0 and v.max() / v.min() > 10:
                for ax in axes[r]:
                    ax.set_yscale("log")
                lo, hi = v.min() / 1.5, v.max() * 1.5
            elif v.size:
                pad = 0.05 * (v.max() - v.min() + 1e-12)
                lo, hi = v.min() - pad, v.max() + pad
            if v.size:
                for ax in axes[r]:
                    ax.set_ylim(lo, hi)
        for ax in axes[r]:
            if ax.get_yscale() == "linear":
                ax.axhline(0, color="0.5", lw=0.6, zorder=0.5)
    for ax in axes[-1]:
        ax.set_xlabel(_time_label(time_unit))
    for name, gap in gaps.items():  # say where a line is missing, never list a line not drawn
        label = _FIT_LABELS.get(name, str(name))
        if label in handles and gap:
            handles[label].set_label(f"{label} (gaps: undefined there)")
        elif label not in handles:
            handles[label] = Line2D([], [], lw=0, label=f"{label}: estimate undefined (band only)")
    legend_outside(fig, list(handles.values()), where="bottom", ncol=3)
    if title:
        fig.suptitle(mathify(title))
    return save_figure(fig, path, formats)[0]


@styled
def plot_goodness_of_fit(gof, path, class_names: Optional[Sequence[str]] = None,
                         title: Optional[str] = None, max_coords: int = 4,
                         formats: Optional[Sequence[str]] = None) -> str:
    """Logged vs simulated trajectories of a fitted SDE (the analogue of Fig. 5 of Zhang, Wang &
    Su 2021): per class, the logged class-mean coordinates (solid) against the simulated mean
    (dashed) and its band; the within-class spread over time; the argmax accuracy over time
    (logged vs simulated with its band); and the summary numbers.

    Args:
        gof: a :class:`~lesde.fit.GoodnessOfFit` (or a mapping with its array fields, e.g. the
            ``gof_<name>.npz`` that ``lesde fit`` writes).
        path: output file (PNG unless its extension says otherwise).
        class_names: optional names of the K classes.
        title: optional suptitle.
        max_coords: at most this many coordinates of each class mean are drawn (all of them for
            logits, p = K).
        formats: further formats written beside ``path`` (e.g. ``("pdf", "svg")``).
    """
    from matplotlib.lines import Line2D

    get = (lambda k: np.asarray(gof[k])) if not hasattr(gof, "ts") else \
        (lambda k: np.asarray(getattr(gof, k)))
    ts = get("ts").astype(float)
    logged, sim, lo, hi = get("logged_means"), get("sim_means"), get("sim_lo"), get("sim_hi")
    T, K, p = logged.shape
    names = list(class_names) if class_names is not None else [f"class {k}" for k in range(K)]
    ncol = max(K, 3)
    fig = new_figure(FULL_WIDTH, 4.9)
    axes = fig.subplots(2, ncol, squeeze=False)
    coords = range(min(p, max_coords))
    xlabel = r"time $t$ (steps $\times$ learning rate)"
    handles = []
    for j in coords:
        cname = (f"logit of {names[j]}" if p == K else f"coordinate {j}")
        handles.append(Line2D([], [], color=color(j), lw=1.4, label=cname))
    handles += [Line2D([], [], color="0.3", lw=1.4, label="logged"),
                Line2D([], [], color="0.3", lw=1.2, ls="--", label="simulated mean"),
                band(axes[0, 0], [], [], [], "0.5", label="simulated band")]
    for k in range(K):
        ax = axes[0, k]
        for j in coords:
            band(ax, ts, lo[:, k, j], hi[:, k, j], color(j))
            ax.plot(ts, logged[:, k, j], color=color(j), lw=1.4, zorder=3)
            ax.plot(ts, sim[:, k, j], color=color(j), lw=1.2, ls="--", zorder=3)
        ax.set_title(f"class mean of {names[k]}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("logit" if p == K else "feature coordinate")
    for k in range(K, ncol):
        axes[0, k].axis("off")
    ax = axes[1, 0]
    ls_, ss_ = get("logged_spread"), get("sim_spread")
    for k in range(K):
        ax.plot(ts, ls_[:, k], color=color(k), lw=1.4, label=names[k])
        ax.plot(ts, ss_[:, k], color=color(k), lw=1.2, ls="--")
    ax.set_yscale("log")
    ax.set_title("within-class spread")
    ax.set_ylabel("spread (colours: classes)")
    ax.set_xlabel(xlabel)
    ax.legend(loc="best", fontsize=6.5)
    ax = axes[1, 1]
    la, sa = get("logged_accuracy"), get("sim_accuracy")
    if np.isfinite(la).any():
        try:
            band(ax, ts, get("sim_accuracy_lo"), get("sim_accuracy_hi"), color(0))
        except (KeyError, AttributeError):
            pass
        ax.plot(ts, la, color="0.15", lw=1.4, zorder=3)
        ax.plot(ts, sa, color=color(0), lw=1.2, ls="--", zorder=3)
        ax.axhline(1 / K, color="0.5", lw=0.8, ls=":")
        handles.append(Line2D([], [], color="0.5", lw=0.8, ls=":", label=f"chance accuracy 1/{K}"))
        ax.set_ylim(0, 1.02)
    else:
        ax.text(0.5, 0.5, "argmax accuracy needs p = K", ha="center", transform=ax.transAxes)
    ax.set_title("argmax accuracy of the tracked samples")
    ax.set_ylabel("accuracy")
    ax.set_xlabel(xlabel)
    ax = axes[1, 2]
    ax.axis("off")
    nums = []
    for key, fmt in (("r2", "$R^2$ of the class means: {:.3f}"),
                     ("coverage", "coverage by the simulated band: {:.2f}"),
                     ("spread_rel_error", "spread relative error: {:.2f}"),
                     ("accuracy_mae", "accuracy mean abs. error: {:.3f}"),
                     ("n_paths", "simulated paths: {:d}")):
        try:
            v = get(key)
            nums.append(fmt.format(int(v) if key == "n_paths" else float(v)))
        except (KeyError, AttributeError, ValueError):
            pass
    try:
        r2k = get("r2_per_class")
        nums.append("$R^2$ per class: " + ", ".join(f"{v:.2f}" for v in np.ravel(r2k)))
    except (KeyError, AttributeError):
        pass
    ax.text(0.02, 0.95, "\n".join(nums), va="top", ha="left", fontsize=8, transform=ax.transAxes,
            linespacing=1.6)
    for k in range(3, ncol):
        axes[1, k].axis("off")
    legend_outside(fig, handles, where="bottom", ncol=min(len(handles), 4))
    fig.suptitle((mathify(title) + "\n" if title else "") + "the fitted SDE simulated from the "
                 "logged state at the first time shown (dashed; band) against the log (solid)")
    return save_figure(fig, path, formats)[0]


@styled
def plot_protocol_summary(summary: Dict[str, dict], path, title: Optional[str] = None,
                          lr: Optional[float] = None, formats: Optional[Sequence[str]] = None) -> str:
    r"""The trials of a protocol run (:func:`lesde.protocols.summarize_protocol`) in one figure.

    Top: validation accuracy and loss against the SGD iteration, mean over the trials with a
    band of one standard deviation, one colour per setting. Bottom: the I-estimator's A(t)
    (solid) and B(t) (dashed) of every trial (thin) and on the class means pooled over trials
    (thick); and the impacts measured on the network, alpha_hat (solid) and beta_hat (dashed),
    mean over trials, per unit of lr-scaled time. With NC measures (``nc1`` ...) a third row
    shows NC1 (log scale) and the NC2 terms, NC3 and NC4 against the iteration.
    ``formats``: further formats written beside ``path``.
    """
    from matplotlib.lines import Line2D

    has_nc = any("nc1" in rec for rec in summary.values())
    rows = 3 if has_nc else 2
    fig = new_figure(FULL_WIDTH, 2.3 * rows + 0.8)
    axes = fig.subplots(rows, 2, sharex=True)
    handles = []
    for c, (setting, rec) in enumerate(summary.items()):
        col = color(c)
        step = rec["step"]
        label = _setting_label(setting) + f" ({len(rec['trials'])} trials)"
        handles.append(Line2D([], [], color=col, lw=1.5, label=label))
        for ax, name in ((axes[0, 0], "test_acc"), (axes[0, 1], "test_loss")):
            v = np.asarray(rec[name], dtype=float)
            m = np.nanmean(v, 0)
            s = np.nanstd(v, 0, ddof=1) if v.shape[0] > 1 else np.zeros_like(m)
            band(ax, step, m - s, m + s, col)
            ax.plot(step, m, color=col, zorder=3)
        ax = axes[1, 0]
        for a, b in zip(rec["A"], rec["B"]):
            ax.plot(step, a, color=col, lw=0.5, alpha=0.4)
            ax.plot(step, b, color=col, lw=0.5, alpha=0.4, ls="--")
        ax.plot(step, rec["A_pooled"], color=col, lw=1.8, zorder=3)
        ax.plot(step, rec["B_pooled"], color=col, lw=1.8, ls="--", zorder=3)
        if "alpha_hat" in rec:
            ax = axes[1, 1]
            ax.plot(rec["impact_step"], np.nanmean(rec["alpha_hat"], 0), color=col, marker="o", ms=3)
            ax.plot(rec["impact_step"], np.nanmean(rec["beta_hat"], 0), color=col, marker="x", ms=3,
                    ls="--")
        if has_nc and "nc1" in rec:
            axes[2, 0].plot(step, np.nanmean(rec["nc1"], 0), color=col)
            for name, ls in (("nc2_equinorm", "-"), ("nc2_etf", "--"), ("nc3", ":"), ("nc4", "-.")):
                axes[2, 1].plot(step, np.nanmean(rec[name], 0), color=col, ls=ls)
    k = None
    for rec in summary.values():
        k = rec["class_mean_logits_train"].shape[-1]
    if k:
        axes[0, 0].axhline(1 / k, color="0.3", lw=0.8, ls=":")
        axes[0, 1].axhline(np.log(k), color="0.3", lw=0.8, ls=":")
        handles.append(Line2D([], [], color="0.3", lw=0.8, ls=":",
                              label=f"chance: accuracy 1/{k}, loss log {k}"))
    handles += [Line2D([], [], color="0.3", lw=1.5, label=r"$A$, $\hat\alpha$ (intra-class)"),
                Line2D([], [], color="0.3", lw=1.5, ls="--", label=r"$B$, $\hat\beta$ (inter-class)")]
    axes[0, 0].set(title="validation accuracy (trial mean $\\pm$ sd)", ylabel="accuracy")
    axes[0, 1].set(title="validation loss (trial mean $\\pm$ sd)", ylabel="cross-entropy (nats)")
    axes[1, 0].set(title="I-estimator: pooled (thick) and per trial (thin)",
                   ylabel=r"$A(t)$, $B(t)$")
    unit = r"per unit $t$ = step $\times$ lr" + (f" (lr {lr:g})" if lr else "")
    axes[1, 1].set(title="impacts measured on the network (trial mean)", ylabel=f"impact, {unit}")
    if axes[1, 1].has_data():
        vals = np.concatenate([np.ravel(r.get("alpha_hat", [])) for r in summary.values()])
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if vals.size and vals.max() / vals.min() > 10:
            axes[1, 1].set_yscale("log")
    if has_nc:
        axes[2, 0].set(title="NC1 of the tracked train features", ylabel=r"$\mathrm{Tr}(\Sigma_W \Sigma_B^+)/K$",
                       yscale="log")
        axes[2, 1].set(title="NC2 (solid: equinorm, dashed: ETF angle), NC3 (dotted), NC4 (dash-dot)",
                       ylabel="measure")
    for ax in axes[-1]:
        ax.set_xlabel("SGD iteration")
    legend_outside(fig, handles, where="bottom", ncol=3)
    if title:
        fig.suptitle(mathify(title))
    return save_figure(fig, path, formats)[0]


def _setting_label(setting: str) -> str:
    """'p030' -> '$p_{err} = 0.30$' (a GeoMNIST label-noise setting); other names unchanged."""
    import re

    m = re.fullmatch(r"p(\d{3})", str(setting))
    return rf"$p_{{err}} = {int(m.group(1)) / 100:.2f}$" if m else str(setting)
