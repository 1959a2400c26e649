"""The plotting style: files in every format, written atomically and reproducibly, math text, and
no change to the caller's matplotlib settings."""
import os
from pathlib import Path

import numpy as np
import pytest

from lesde import plotting


def _figure():
    fig = plotting.new_figure(3, 2)
    ax = fig.subplots()
    x = np.linspace(0, 1, 20)
    h = plotting.band(ax, x, x - 0.1, x + 0.1, plotting.color(0), label="band")
    plotting.band(ax, x, x - 0.2, x + 0.05, plotting.color(1), kind="hatch")
    ax.plot(x, x, color=plotting.color(0), label=r"$\alpha$")
    plotting.legend_outside(fig, [h], where="bottom")
    return fig


def test_save_figure_writes_every_format_reproducibly(tmp_path):
    with plotting.style():
        paths = plotting.save_figure(_figure(), tmp_path / "f.png")
    assert paths == [str(tmp_path / f"f.{e}") for e in ("png", "pdf", "svg")]
    first = {p: Path(p).read_bytes() for p in paths}
    assert first[paths[0]][:8] == b"\x89PNG\r\n\x1a\n" and first[paths[1]][:5] == b"%PDF-"
    assert b"<svg" in first[paths[2]][:500]
    with plotting.style():
        plotting.save_figure(_figure(), tmp_path / "f.png")
    for p in paths:  # no dates: the same figure gives the same bytes
        assert Path(p).read_bytes() == first[p], p
    assert sorted(os.listdir(tmp_path)) == ["f.pdf", "f.png", "f.svg"]  # no temporary files
    assert plotting.save_figure(_figure(), tmp_path / "g.pdf", formats=None) == [str(tmp_path / "g.pdf")]
    assert plotting.figure_paths("a/b", ["svg"]) == ["a/b.svg"]
    assert plotting.figure_paths("a/b.png", ["png", "pdf"]) == ["a/b.png", "a/b.pdf"]


def test_style_leaves_the_callers_settings_alone():
    import matplotlib

    before = dict(matplotlib.rcParams)
    with plotting.style():
        assert matplotlib.rcParams["mathtext.fontset"] == "dejavusans"
        assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0] == plotting.PALETTE[0]
    assert dict(matplotlib.rcParams) == before


def test_mathify_and_band_errors():
    assert plotting.mathify("alpha = 1, beta = 0.2") == r"$\alpha = 1$, $\beta = 0.2$"
    assert plotting.mathify("not elastic: alpha = beta = 1") == r"not elastic: $\alpha$ = $\beta = 1$"
    assert plotting.mathify("r_alpha and sigma = 1e-3") == r"$r_\alpha$ and $\sigma = 1e-3$"
    assert plotting.mathify("$x$ alpha") == "$x$ alpha"  # already math: unchanged
    assert plotting.mathify("alphabet") == "alphabet"
    fig = plotting.new_figure()
    with pytest.raises(ValueError, match="kind"):
        plotting.band(fig.subplots(), [0, 1], [0, 0], [1, 1], "k", kind="dots")
