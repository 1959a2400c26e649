"""Figures. Every function reads results (Solutions, tables, arrays) and writes one PNG.

Nothing here simulates or trains; the command line runs the jobs and calls these.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["class_mean_plane", "plot_demo", "plot_sgd_vs_sde", "training_loss_curve",
           "plot_phase", "plot_neural_collapse", "plot_feature_clouds",
           "plot_torus_locality", "plot_matrix", "plot_elasticity_tracking", "plot_fit",
           "plot_goodness_of_fit"]


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


def plot_phase(table, path, value: str = "p_sep", title: Optional[str] = None,
               theory_c: Optional[float] = None) -> str:
    """Draw a phase-sweep table (:func:`lesde.phase.run_sweep`), one panel per scoring time T.

    Two swept parameters: heat maps of ``value`` (first grid name on the x axis, the diagonal
    alpha = beta drawn when the axes are alpha and beta); with ``value="p_sep"`` a second row
    shows LP separability (any affine classifier, a weaker notion). One swept parameter:
    curves of ``value`` and of ``p_lp`` against it, one colour per T, with standard errors; a
    decay exponent on the x axis gets the line r = 1 and, with ``theory_c``, the heuristic
    boundary of :func:`_decay_boundary` per T (dotted)."""
    plt = _plt()
    names = _swept(table)
    times = sorted(table["T"].unique())
    notion = str(table["notion"].iloc[0]) if "notion" in table.columns else value
    spec = table.attrs.get("spec", {})
    desc = (f"{spec.get('drift', '')} drift, {spec.get('noise', '')} noise"
            + (f" (lr = {spec.get('lr'):g})" if spec.get("noise") in ("sgd", "both") else "")
            + (f", sigma = {spec.get('sigma'):g}" if spec.get("noise") in ("additive", "both") else "")
            + f", K = {spec.get('K')}, n = {spec.get('n')}, {spec.get('replicates')} replicates"
            + (", co-moving frame" if spec.get("comoving") else ""))
    label = {"p_sep": f"P(separable at T): {notion} (order parameter)",
             "p_lp": "P(LP-separable at T): any affine classifier"}.get(value, value)
    if len(names) == 2:
        xname, yname = names
        short = {"p_sep": f"P(sep.): {notion}", "p_lp": "P(LP-separable): any affine classifier"}
        rows = [(value, short.get(value, value))]
        if value == "p_sep" and table["p_lp"].notna().any():
            rows.append(("p_lp", "P(LP-separable), weaker notion"))
        fig, axes = plt.subplots(len(rows), len(times), figsize=(4.0 * len(times), 3.5 * len(rows)),
                                 squeeze=False)
        xs = np.sort(table[xname].unique())
        ys = np.sort(table[yname].unique())
        for r, (col, lab) in enumerate(rows):
            for c, T in enumerate(times):
                ax = axes[r, c]
                g = table[table["T"] == T].pivot_table(index=yname, columns=xname, values=col)
                g = g.reindex(index=ys, columns=xs)
                dx = (xs[-1] - xs[0]) / max(len(xs) - 1, 1) / 2
                dy = (ys[-1] - ys[0]) / max(len(ys) - 1, 1) / 2
                prob = col.startswith("p_")
                im = ax.imshow(g.to_numpy(), origin="lower", aspect="auto", cmap="viridis",
                               extent=[xs[0] - dx, xs[-1] + dx, ys[0] - dy, ys[-1] + dy],
                               vmin=0 if prob else None, vmax=1 if prob else None)
                if {xname, yname} == {"alpha", "beta"}:
                    lo, hi = max(xs[0], ys[0]), min(xs[-1], ys[-1])
                    ax.plot([lo, hi], [lo, hi], "w--", lw=1, label="alpha = beta")
                    ax.legend(fontsize=7, loc="upper left")
                ax.set_xlabel(xname)
                ax.set_ylabel(yname)
                ax.grid(False)
                ax.set_title(f"{lab}, T = {T:g}", fontsize=8.5)
                fig.colorbar(im, ax=ax, fraction=0.046)
    elif len(names) == 1:
        xname = names[0]
        fig, ax = plt.subplots(figsize=(10.0, 4.2))
        for i, T in enumerate(times):
            g = table[table["T"] == T].sort_values(xname)
            color = _PALETTE[i % 10]
            ax.errorbar(g[xname], g[value], yerr=g.get(f"{value}_se"), color=color, lw=1.6, marker="o",
                        ms=3, capsize=2, label=f"T = {T:g}: {notion}" if value == "p_sep" else f"T = {T:g}")
            if value == "p_sep" and g["p_lp"].notna().any():
                ax.plot(g[xname], g["p_lp"], ls="--", color=color, lw=1, label=f"T = {T:g}: LP (any affine)")
            if theory_c is not None and xname in ("r", "r_alpha", "r_beta"):
                rstar = _decay_boundary(spec, T, theory_c)
                if rstar is not None:
                    ax.axvline(rstar, color=color, ls=":", lw=1.2,
                               label=f"T = {T:g}: exp((A-B)/K) s0 = {theory_c:g} w(T) at r = {rstar:.3f}")
        if xname in ("r", "r_alpha", "r_beta"):
            ax.axvline(1.0, color="k", lw=0.8, label="r = 1 (A(t) diverges iff r <= 1)")
            grid = dict(spec.get("grid", []))
            a0 = grid.get("alpha", [spec.get("alpha")])[0]
            b0 = grid.get("beta", [spec.get("beta")])[0]
            ea, eb = ("r", "r") if xname == "r" else ("r_alpha", "r_beta")
            desc += (f"\nalpha(t) = {a0:g} (1 + t/{spec.get('t0'):g})^(-{ea}), "
                     f"beta(t) = {b0:g} (1 + t/{spec.get('t0'):g})^(-{eb})"
                     + (f", r_alpha = {spec.get('r_alpha'):g}" if xname == "r_beta" else "")
                     + (f", r_beta = {spec.get('r_beta'):g}" if xname == "r_alpha" else ""))
        ax.set_xlabel(xname)
        ax.set_ylabel(label if value.startswith("p_") else value)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        raise ValueError(f"plot_phase draws sweeps over one or two parameters; this one sweeps {names}")
    fig.suptitle(title or desc, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_neural_collapse(summary, path, title: Optional[str] = None) -> str:
    """NC1, NC2 (ETF angle, equinorm), NC3, NC4 and the training loss against time, one line per
    case. ``summary``: columns ``case``, ``t``, ``nc1``, ``etf_angle``, ``equinorm``,
    ``equiangularity``, ``nc3``, ``nc4``, ``loss`` (e.g. medians of
    :func:`lesde.phase.collapse_over_time` over runs)."""
    plt = _plt()
    panels = [("nc1", "NC1 = Tr(S_W S_B^+)/K", True), ("etf_angle", "NC2: mean |cos + 1/(K-1)|", True),
              ("equinorm", "NC2: equinorm (CV of |mu_k - mu_G|)", True),
              ("nc3", "NC3: |W^T/|W| - M/|M||^2 (W = centred I)", False),
              ("nc4", "NC4: argmax != nearest class mean", False),
              ("loss", "training cross-entropy of the logits", True)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (col, lab, logy) in zip(axes.ravel(), panels):
        for i, (case, g) in enumerate(summary.groupby("case", sort=False)):
            g = g[g["t"] > 0]
            ax.plot(g["t"], g[col], color=_PALETTE[i % 10], lw=1.8, label=case)
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("time t")
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_feature_clouds(cases: Dict[str, "object"], path, run: int = 0, subtitle: str = "") -> str:
    """Feature clouds at every save time (columns) for each case (rows; title -> Solution with
    full states): samples minus the grand mean, projected on the plane of the class means at
    that time (:func:`class_mean_plane`); class means as large markers. Panel titles give the
    training loss and accuracy of the logits when p = K."""
    plt = _plt()
    first = next(iter(cases.values()))
    T = first.ts.shape[0]
    fig, axes = plt.subplots(len(cases), T, figsize=(3.3 * T, 3.2 * len(cases)), squeeze=False)
    for r, (title, sol) in enumerate(cases.items()):
        y = sol.labels
        K = int(y.max()) + 1
        for c in range(T):
            ax = axes[r, c]
            X = sol.states[c, run]
            if not np.isfinite(X).all():
                ax.set_title(f"t = {sol.ts[c]:g}: overflowed", fontsize=8)
                continue
            means = sol.class_means[c, run]
            grand = means.mean(0)
            _, basis = class_mean_plane(means)
            pts = (X - grand) @ basis
            mp = (means - grand) @ basis
            for k in range(K):
                sel = y == k
                ax.scatter(pts[sel, 0], pts[sel, 1], s=7, color=_PALETTE[k % 10], alpha=0.6,
                           edgecolors="none", label=f"class {k}" if c == 0 else None)
                ax.scatter(mp[k, 0], mp[k, 1], s=70, color=_PALETTE[k % 10], marker="X",
                           edgecolors="k", linewidths=0.6, zorder=3)
            extra = ""
            if X.shape[1] == K:
                loss, acc = training_loss_curve(X[None, None], y)
                extra = f"\nloss {float(loss[0, 0]):.3g}, acc {float(acc[0, 0]):.2f}"
            ax.set_title(f"t = {sol.ts[c]:g}{extra}", fontsize=8)
            ax.set_aspect("equal", adjustable="datalim")
            ax.tick_params(labelsize=6)
        axes[r, 0].set_ylabel(title, fontsize=8)
        axes[r, 0].legend(fontsize=6, loc="best")
    fig.suptitle("samples minus grand mean, projected on the plane of the class means (X: class means)"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


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


def plot_fit(ts, estimates, measured: Optional[dict] = None, path="fit.png",
             title: Optional[str] = None, time_unit: str = "t = step x lr") -> str:
    """Fitted impacts of ``lesde fit``: A(t), B(t) and alpha(t), beta(t) of each estimator with
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
            ``store.impacts()``; drawn as diamonds.
        path: output PNG.
        title: optional suptitle.
        time_unit: how the time axis is labelled.

    The alpha and beta axes of a row share one y-range (log scale when all values are
    positive and span more than a decade), so intra- and inter-class impacts can be compared.
    """
    plt = _plt()
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
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
    colors = {n: _PALETTE[i % 10] for i, n in enumerate(estimates)}
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
                marker = "o" if len(c[tkey]) <= 40 else None
                ax.plot(c[tkey], c[key], color=colors[name], lw=1.6, marker=marker, ms=3,
                        label=label + ("" if row == "AB" else " (fitted)"))
                vals.append(c[key])
                if f"{key}_lo" in c:
                    ax.fill_between(c[tkey], c[f"{key}_lo"], c[f"{key}_hi"],
                                    color=colors[name], alpha=0.2, lw=0)
                    vals += [c[f"{key}_lo"], c[f"{key}_hi"]]
            if measured is not None and row == meas_row:
                mv = np.asarray(measured[key], dtype=float)
                ax.plot(np.asarray(measured["time"], dtype=float), mv, ls="none", marker="D",
                        ms=6, mfc="none", mec="k", mew=1.3,
                        label=f"measured {key}_hat (first order, on the network)")
                vals.append(mv)
            unit = {"A": "A(t) = int alpha dt (intra)", "B": "B(t) = int beta dt (inter)",
                    "alpha": "alpha(t), intra-class, per unit t",
                    "beta": "beta(t), inter-class, per unit t"}[key]
            what = "cross-entropy drift" if row == "reg" else "I/L model"
            ax.set_ylabel(f"{unit}\n({what})", fontsize=8)
            ax.set_xlabel(f"lr-scaled time ({time_unit})")
            if ts.size:
                ax.set_xlim(ts.min(), ts.max())
            ax.legend(fontsize=7, loc="best")
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
                ax.axhline(0, color="0.5", lw=0.6)
    fig.suptitle((title + "\n" if title else "") + "fitted impacts (lines; shaded: "
                 "band)" + ("; diamonds: directly measured" if measured is not None else ""),
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_goodness_of_fit(gof, path, class_names: Optional[Sequence[str]] = None,
                         title: Optional[str] = None, max_coords: int = 4) -> str:
    """Logged vs simulated trajectories of a fitted SDE (the analogue of Fig. 5 of Zhang, Wang &
    Su 2021): per class, the logged class-mean coordinates (solid) against the simulated mean
    (dashed) and its band (shaded); the within-class spread over time; the argmax accuracy over
    time (logged vs simulated with its band); and the summary numbers.

    Args:
        gof: a :class:`~lesde.fit.GoodnessOfFit` (or a mapping with its array fields, e.g. the
            ``gof_<name>.npz`` that ``lesde fit`` writes).
        path: output PNG.
        class_names: optional names of the K classes.
        title: optional suptitle.
        max_coords: at most this many coordinates of each class mean are drawn (all of them for
            logits, p = K).
    """
    plt = _plt()
    get = (lambda k: np.asarray(gof[k])) if not hasattr(gof, "ts") else \
        (lambda k: np.asarray(getattr(gof, k)))
    ts = get("ts").astype(float)
    logged, sim, lo, hi = get("logged_means"), get("sim_means"), get("sim_lo"), get("sim_hi")
    T, K, p = logged.shape
    names = list(class_names) if class_names is not None else [f"class {k}" for k in range(K)]
    ncol = max(K, 3)
    fig, axes = plt.subplots(2, ncol, figsize=(3.6 * ncol, 6.8), squeeze=False)
    coords = range(min(p, max_coords))
    for k in range(K):
        ax = axes[0, k]
        for j in coords:
            color = _PALETTE[j % 10]
            cname = (f"logit of {names[j]}" if p == K else f"coordinate {j}")
            ax.plot(ts, logged[:, k, j], color=color, lw=1.6, label=cname)
            ax.plot(ts, sim[:, k, j], color=color, lw=1.3, ls="--")
            ax.fill_between(ts, lo[:, k, j], hi[:, k, j], color=color, alpha=0.18, lw=0)
        ax.set_title(f"class mean of {names[k]}", fontsize=9)
        ax.set_xlabel("lr-scaled time t = step x lr")
        ax.set_ylabel("logit" if p == K else "feature coordinate")
        if k == 0:
            ax.legend(fontsize=6, loc="best", ncol=1)
    for k in range(K, ncol):
        axes[0, k].axis("off")
    ax = axes[1, 0]
    ls_, ss_ = get("logged_spread"), get("sim_spread")
    for k in range(K):
        ax.plot(ts, ls_[:, k], color=_PALETTE[k % 10], lw=1.6, label=names[k])
        ax.plot(ts, ss_[:, k], color=_PALETTE[k % 10], lw=1.3, ls="--")
    ax.set_yscale("log")
    ax.set_title("within-class spread (solid: logged, dashed: simulated)", fontsize=9)
    ax.set_xlabel("lr-scaled time t = step x lr")
    ax.legend(fontsize=6)
    ax = axes[1, 1]
    la, sa = get("logged_accuracy"), get("sim_accuracy")
    if np.isfinite(la).any():
        ax.plot(ts, la, color="k", lw=1.6, label="logged")
        ax.plot(ts, sa, color=_PALETTE[0], lw=1.3, ls="--", label="simulated mean")
        try:
            ax.fill_between(ts, get("sim_accuracy_lo"), get("sim_accuracy_hi"), color=_PALETTE[0],
                            alpha=0.2, lw=0, label="simulated band")
        except (KeyError, AttributeError):
            pass
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "argmax accuracy needs p = K", ha="center", transform=ax.transAxes)
    ax.set_title("argmax accuracy of the tracked samples", fontsize=9)
    ax.set_xlabel("lr-scaled time t = step x lr")
    ax = axes[1, 2]
    ax.axis("off")
    nums = []
    for key, fmt in (("r2", "R^2 of the class means: {:.3f}"),
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
        nums.append("R^2 per class: " + ", ".join(f"{v:.2f}" for v in np.ravel(r2k)))
    except (KeyError, AttributeError):
        pass
    ax.text(0.02, 0.95, "\n".join(nums), va="top", ha="left", fontsize=9, transform=ax.transAxes)
    for k in range(3, ncol):
        axes[1, k].axis("off")
    fig.suptitle((title + "\n" if title else "") + "fitted SDE simulated from the logged state "
                 "at the first time shown (dashed, shaded: band) against the log (solid)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
