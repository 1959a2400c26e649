"""The local-elasticity figures: drawn in the package's style (words and math text, not code
names; every axis labelled; legends outside the axes; the Okabe-Ito palette; PNG, PDF and SVG;
the caller's matplotlib settings untouched), and every committed figure of figures/elasticity
redraws from the tables committed beside it."""
import glob
import importlib.util
import os
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lesde import figures, plotting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ELASTICITY = os.path.join(REPO, "figures", "elasticity")


def _redraw_module():
    path = os.path.join(ELASTICITY, "redraw.py")
    spec = importlib.util.spec_from_file_location("elasticity_redraw", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def drawn(monkeypatch):
    """Figures handed to save_figure by lesde.figures, kept for inspection (nothing written)."""
    kept = []

    def keep(fig, path, formats=plotting.FORMATS, dpi=None):
        kept.append(fig)
        return plotting.figure_paths(path, formats)

    monkeypatch.setattr(figures, "save_figure", keep)
    return kept


def _texts(fig):
    """Every visible string of the figure: titles, labels, tick labels, legend entries."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _outside_math(text):
    return "".join(re.split(r"\$[^$]*\$", text))


def _has_label(ax, which):
    """An axis is labelled by its own label, a shared sibling's, or text tick labels."""
    shared = ax.get_shared_x_axes() if which == "x" else ax.get_shared_y_axes()
    for a in shared.get_siblings(ax):
        if (a.get_xlabel() if which == "x" else a.get_ylabel()).strip():
            return True
    ticks = ax.get_xticklabels() if which == "x" else ax.get_yticklabels()
    return any(re.search(r"[a-zA-Z]{3}", t.get_text()) for t in ticks)


def _check_style(fig, code_names):
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D

    texts = _texts(fig)
    assert texts
    for text in texts:
        plain = _outside_math(text)
        assert "_" not in plain, f"code name in {text!r}"
        for name in code_names:
            assert name not in plain, f"{name!r} in {text!r}"
    allowed = {to_hex(c) for c in plotting.PALETTE} | {"#000000", "#ffffff"}
    for ax in fig.get_axes():
        if not ax.get_visible() or not ax.axison or ax.get_label() == "<colorbar>":
            continue
        assert _has_label(ax, "x") and _has_label(ax, "y"), ax.get_title()
        assert ax.get_legend() is None  # one figure legend, outside the axes
        for line in ax.findobj(Line2D):
            c = to_hex(line.get_color())
            grey = c[1:3] == c[3:5] == c[5:7]
            assert c in allowed or grey, c


def _tracking_frame(records=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    frame = {"step": np.arange(1, records + 1), "epoch": np.arange(1, records + 1) / 2,
             "train_acc": np.full(records, 0.5), "test_acc": np.full(records, 0.5)}
    for m in ("kl", "kl_compat", "norm", "norm_prob", "suhe_compat"):
        for a in range(k):
            for b in range(k):
                frame[f"{m}_{a}_{b}"] = rng.uniform(0.1, 0.2, records) + (0.1 if a == b else 0.0)
    return pd.DataFrame(frame)


def test_every_elasticity_figure_is_drawn_in_the_package_style(drawn):
    import matplotlib

    before = dict(matplotlib.rcParams)
    rng = np.random.default_rng(0)
    results = {name: SimpleNamespace(distance=rng.uniform(0, np.pi, 50), s_rel=rng.uniform(0, 1, 50),
                                     pearson=-0.5) for name in ("relu", "elephant_spread")}
    figures.plot_torus_locality(results, "torus.png")
    figures.plot_matrix(rng.uniform(size=(6, 6)), "S_relative (symmetrised)", "m.png")
    frames = [_tracking_frame(seed=s) for s in range(2)]
    figures.plot_elasticity_tracking(frames[0], ["airplane", "automobile", "ship"], "c.png")
    figures.plot_tracking_statistics(frames, ["airplane", "automobile", "ship"], "t.png")
    edges = np.linspace(0, np.pi, 7)
    profiles = {(n, s): [rng.uniform(size=6) for _ in range(3)]
                for n in ("relu", "elephant_spread") for s in (0, 100)}
    figures.plot_torus_profiles(profiles, edges, "p.png")
    summary = pd.read_csv(os.path.join(ELASTICITY, "elephant", "clustering", "clustering_summary.csv"),
                          keep_default_na=False, na_values=[""])
    figures.plot_clustering_summary(summary, "cl.png")
    table = pd.read_csv(os.path.join(ELASTICITY, "dan_repro_w025", "dan_comparison.csv"),
                        keep_default_na=False, na_values=[""])
    figures.plot_dan_comparison(table, "d.png")
    assert len(drawn) == 7
    code = ["S_rel", "S_relative", "kl_compat", "suhe_compat", "norm_prob", "elephant_spread",
            "kmeans", "relu"]
    for i, fig in enumerate(drawn):
        _check_style(fig, code)
        assert fig.legends or i in (0, 1)  # one series per panel in the scatter and the matrix
    # the matrix: one colour bar, the similarity typeset
    assert any(ax.get_label() == "<colorbar>" for ax in drawn[1].get_axes())
    assert r"$S_{\mathrm{rel}}$" in drawn[1].get_axes()[0].get_title()
    # no pyplot or seaborn state left behind
    assert dict(matplotlib.rcParams) == before


def test_elasticity_figures_write_png_pdf_and_svg(tmp_path):
    edges = np.linspace(0, np.pi, 7)
    profiles = {("relu", 0): [np.linspace(1, 0, 6)] * 2, ("relu", 10): [np.linspace(0.9, 0, 6)] * 2}
    out = figures.plot_torus_profiles(profiles, edges, tmp_path / "torus.png")
    assert out == str(tmp_path / "torus.png")
    assert sorted(os.listdir(tmp_path)) == ["torus.pdf", "torus.png", "torus.svg"]
    only = figures.plot_torus_profiles(profiles, edges, tmp_path / "one.png", formats=["png"])
    assert os.path.exists(only) and not os.path.exists(tmp_path / "one.pdf")


def test_every_committed_elasticity_figure_has_a_redraw_source():
    """Each committed PNG of figures/elasticity is one that redraw.py makes from a table beside
    it, and the gallery shows it with that command."""
    redraw = _redraw_module()
    made = set()
    for name, job in redraw.JOBS:
        outputs = {"clustering_summary.csv": ["clustering.png"], "torus_locality.csv": ["torus_locality.png"],
                   "tracking_summary.json": ["tracking.png", "tracking_curves_run0.png"],
                   "dan_comparison.csv": ["dan_comparison.png"]}[name]
        for folder in redraw._folders(ELASTICITY, name):
            made |= {os.path.normpath(os.path.join(folder, o)) for o in outputs}
    committed = {os.path.relpath(p, ELASTICITY)
                 for p in glob.glob(os.path.join(ELASTICITY, "**", "*.png"), recursive=True)}
    assert committed == made
    for png in committed:  # and in PDF and SVG beside it
        stem = os.path.join(ELASTICITY, os.path.splitext(png)[0])
        assert os.path.exists(stem + ".pdf") and os.path.exists(stem + ".svg"), png
    with open(os.path.join(REPO, "figures", "README.md")) as f:
        gallery = f.read()
    for png in committed:
        assert f'src="elasticity/{png}"' in gallery, png
    assert "python figures/elasticity/redraw.py" in gallery


def test_committed_elasticity_figures_redraw_from_their_tables(tmp_path):
    """No data, no network, no measurement: the tables beside the figures are enough (a subset
    of the folders, one of each kind, PNG only)."""
    redraw = _redraw_module()
    wrote = redraw.redraw(ELASTICITY, str(tmp_path), ["png"],
                          only=["elephant/clustering", "elephant/torus", "elephant/track_tanh",
                                "dan_repro_w025"])
    names = sorted(os.path.relpath(p, tmp_path) for p in wrote)
    assert names == sorted(os.path.normpath(p) for p in [
        "elephant/clustering/clustering.png", "elephant/torus/torus_locality.png",
        "elephant/track_tanh/tracking.png", "elephant/track_tanh/tracking_curves_run0.png",
        "dan_repro_w025/dan_comparison.png"])
    assert all(os.path.getsize(p) > 20_000 for p in wrote)
