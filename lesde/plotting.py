r"""One plotting style for every figure lesde draws.

The figure functions of :mod:`lesde.figures` draw inside :func:`style` (or are decorated with
:func:`styled`) and write through :func:`save_figure`. What the style fixes:

* **Type**: 8-9 pt text at a paper's full width (about 7 inches), DejaVu Sans with matching math
  text, so symbols are typeset (``$\alpha$``, ``$\mathrm{Tr}(\Sigma_W \Sigma_B^+)/K$``) rather
  than spelled; PDF fonts embedded as TrueType (editable), SVG text as paths (identical on every
  viewer).
* **Colour**: the Okabe-Ito palette (Okabe & Ito, *Color universal design*, 2008), distinct for
  the common forms of colour blindness, for categories; viridis (perceptually uniform, legible in
  grey scale) for continuous values.
* **Bands** (:func:`band`): a filled band is light and edged in its own colour, a second band is
  hatched rather than filled, and mean lines are drawn above both, so overlapping bands keep their
  hues instead of mixing into brown.
* **Legends and colour bars outside the data** (:func:`legend_outside`,
  :func:`shared_colorbar`): one legend per figure in the margin, one colour bar for panels that
  share a scale.
* **Files** (:func:`save_figure`): PNG (200 dpi), PDF and SVG from one call, each written
  atomically (:func:`lesde.storage.atomic_write`), without time stamps, so regenerating a figure
  from the same numbers gives the same bytes.

Figures are built as :class:`matplotlib.figure.Figure` objects (:func:`new_figure`), not through
pyplot: nothing global changes (no backend switch, no pyplot state), so the functions are safe to
call from notebooks and scripts alike.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from typing import Iterable, List, Optional, Sequence

__all__ = ["PALETTE", "CMAP", "FULL_WIDTH", "RC", "FORMATS", "color", "style", "styled",
           "new_figure", "band", "halo", "legend_outside", "shared_colorbar", "mathify",
           "save_figure", "figure_paths", "show"]

#: Okabe-Ito colours (blue, vermillion, bluish green, reddish purple, orange, sky blue, yellow,
#: black), ordered so that the first three are far apart for every common colour-vision type.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
#: colour map for continuous values (probabilities, similarity matrices)
CMAP = "viridis"
#: width in inches of a full-width figure in a two-column paper
FULL_WIDTH = 7.2
#: formats written by default
FORMATS = ("png", "pdf", "svg")

RC = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "mathtext.fontset": "dejavusans",
    "font.size": 8.5,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8.5,
    "figure.titlesize": 9.5,
    "legend.fontsize": 7.5,
    "legend.title_fontsize": 8,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "axes.prop_cycle": None,  # set below from PALETTE
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "0.88",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "axes.linewidth": 0.7,
    "lines.linewidth": 1.5,
    "lines.markersize": 3.5,
    "legend.frameon": False,
    "image.cmap": CMAP,
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    "pdf.fonttype": 42,
    "svg.fonttype": "path",
    "svg.hashsalt": "lesde",
    "hatch.linewidth": 0.7,
    "errorbar.capsize": 2,
}


def _rc() -> dict:
    from cycler import cycler

    rc = dict(RC)
    rc["axes.prop_cycle"] = cycler(color=list(PALETTE))
    return rc


def color(i: int) -> str:
    """The i-th colour of :data:`PALETTE` (cycling)."""
    return PALETTE[int(i) % len(PALETTE)]


@contextlib.contextmanager
def style():
    """Context in which lesde figures are drawn: matplotlib's defaults plus :data:`RC`, restored
    on exit (the caller's rcParams are untouched)."""
    import matplotlib.style

    with matplotlib.style.context(["default", _rc()]):
        yield


def styled(fn):
    """Decorator: run a figure function inside :func:`style` (signature unchanged)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with style():
            return fn(*args, **kwargs)
    return wrapper


def new_figure(width: float = FULL_WIDTH, height: float = 4.0, **kwargs):
    """A :class:`matplotlib.figure.Figure` with constrained layout (not registered with
    pyplot: no backend is needed to save it, and nothing has to be closed)."""
    from matplotlib.figure import Figure

    kwargs.setdefault("layout", "constrained")
    return Figure(figsize=(width, height), **kwargs)


def halo(width: float = 2.6, color: str = "black"):
    """Path effects that outline a line or text, so a light line stays visible on light colours
    and a dark one on dark colours: ``ax.plot(..., color="white", path_effects=halo())``."""
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=width, foreground=color)]


def band(ax, x, lo, hi, color: str, kind: str = "fill", label: Optional[str] = None,
         alpha: float = 0.22, hatch: str = "////"):
    """A band between ``lo`` and ``hi`` that does not mix into its neighbours.

    ``kind="fill"``: a light fill with thin edges in the same colour; ``kind="hatch"``: hatching
    and edges, no fill; ``kind="edges"``: the edges alone. Bands sit below lines (zorder 1), so
    draw the mean lines after (default zorder 2). Returns a legend handle.
    """
    import numpy as np
    from matplotlib.patches import Patch

    x, lo, hi = (np.asarray(v, dtype=float) for v in (x, lo, hi))
    if kind == "fill":
        ax.fill_between(x, lo, hi, facecolor=color, alpha=alpha, lw=0, zorder=1)
    elif kind == "hatch":
        ax.fill_between(x, lo, hi, facecolor="none", edgecolor=color, hatch=hatch, lw=0,
                        alpha=0.55, zorder=1)
    elif kind != "edges":
        raise ValueError(f"kind must be 'fill', 'hatch' or 'edges', got {kind!r}")
    for edge in (lo, hi):
        ax.plot(x, edge, color=color, lw=0.6, alpha=0.8, zorder=1.5)
    if kind == "fill":
        return Patch(facecolor=color, alpha=alpha + 0.1, edgecolor=color, label=label)
    return Patch(facecolor="none", edgecolor=color, hatch=hatch if kind == "hatch" else None,
                 label=label)


def legend_outside(fig, handles=None, labels=None, where: str = "right", ncol: Optional[int] = None,
                   title: Optional[str] = None):
    """One legend for the whole figure, in the margin (``where``: "right", "bottom" or "top"),
    never over data. Without ``handles`` the labelled artists of all axes are collected, each
    label once."""
    if handles is None:
        seen = {}
        for ax in fig.get_axes():
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab and not lab.startswith("_") and lab not in seen:
                    seen[lab] = h
        handles, labels = list(seen.values()), list(seen)
    elif labels is None:
        labels = [h.get_label() for h in handles]
    if not handles:
        return None
    loc = {"right": "outside right upper", "bottom": "outside lower center",
           "top": "outside upper center"}[where]
    if ncol is None:
        ncol = 1 if where == "right" else min(len(handles), 4)
    return fig.legend(handles, labels, loc=loc, ncol=ncol, title=title)


def shared_colorbar(fig, mappable, axes, label: str, location: str = "right", **kwargs):
    """One colour bar for several panels drawn with the same norm (constrained layout places it
    beside all of them)."""
    kwargs.setdefault("shrink", 0.9 if location in ("right", "left") else 0.6)
    kwargs.setdefault("aspect", 30)
    cb = fig.colorbar(mappable, ax=axes, location=location, label=label, **kwargs)
    cb.outline.set_linewidth(0.5)
    return cb


_GREEK = {"alpha": r"\alpha", "beta": r"\beta", "sigma": r"\sigma", "r_alpha": r"r_\alpha",
          "r_beta": r"r_\beta", "eta": r"\eta"}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def mathify(text: str) -> str:
    """Typeset parameter names in plain-text labels: ``"alpha = 1, beta = 0.2"`` ->
    ``"$\\alpha = 1$, $\\beta = 0.2$"``; bare ``alpha``/``beta``/``sigma`` become symbols.
    Text that already holds math (``$``) is returned unchanged."""
    text = str(text)
    if "$" in text:
        return text
    names = "|".join(sorted(_GREEK, key=len, reverse=True))

    def assign(m):
        return f"${_GREEK[m.group(1)]} = {m.group(2)}$"

    text = re.sub(rf"\b({names})\s*=\s*({_NUMBER})", assign, text)
    parts = re.split(r"(\$[^$]*\$)", text)
    for i, part in enumerate(parts):
        if not part.startswith("$"):
            parts[i] = re.sub(rf"\b({names})\b", lambda m: f"${_GREEK[m.group(1)]}$", part)
    return "".join(parts)


def figure_paths(path, formats: Optional[Iterable[str]] = None) -> List[str]:
    """The files :func:`save_figure` writes for ``path``: the path itself, then the same stem
    with each further format (``formats=None``: the format of ``path`` alone)."""
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    ext = ext.lstrip(".").lower()
    fmts = [] if not ext else [ext]
    for f in (formats or ()):
        f = str(f).lstrip(".").lower()
        if f and f not in fmts:
            fmts.append(f)
    if not fmts:
        fmts = ["png"]
    if not ext:
        return [f"{path}.{f}" for f in fmts]
    return [path] + [f"{stem}.{f}" for f in fmts[1:]]


_METADATA = {"png": {"Software": None}, "pdf": {"Creator": None, "Producer": None,
                                                 "CreationDate": None},
             "svg": {"Creator": None, "Date": None}}


def save_figure(fig, path, formats: Optional[Sequence[str]] = FORMATS, dpi: Optional[float] = None
                ) -> List[str]:
    """Write ``fig`` to ``path`` and beside it in the other ``formats`` (same stem); returns the
    paths written, ``path`` first.

    Each file goes through a temporary file and a rename (a reader never sees half a figure),
    without creation dates (same figure, same bytes). Parent directories are created. With a
    pyplot figure, close it yourself afterwards.
    """
    from .storage import atomic_write

    paths = figure_paths(path, formats)
    for p in paths:
        os.makedirs(os.path.dirname(os.path.abspath(p)) or ".", exist_ok=True)
        fmt = os.path.splitext(p)[1].lstrip(".").lower()
        kwargs = {"format": fmt, "metadata": _METADATA.get(fmt), "dpi": dpi or RC["savefig.dpi"],
                  "bbox_inches": "tight", "pad_inches": RC["savefig.pad_inches"]}
        with atomic_write(p, "wb", fsync=False) as f:
            fig.savefig(f, **kwargs)
    return [str(p) for p in paths]


def show(path, width: int = 900):
    """A figure file for display in a notebook (``IPython.display.Image``), a PNG scaled down to
    at most ``width`` pixels with a 128-colour palette, so a notebook stays small; ``path`` may be any file
    :func:`save_figure` wrote (the PNG beside it is shown)."""
    import io

    from IPython.display import Image
    from PIL import Image as PILImage

    png = os.path.splitext(os.fspath(path))[0] + ".png"
    with PILImage.open(png) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), PILImage.LANCZOS)
        im = im.quantize(colors=128, method=PILImage.Quantize.MEDIANCUT)  # a palette PNG: small
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return Image(data=buf.getvalue(), format="png")
