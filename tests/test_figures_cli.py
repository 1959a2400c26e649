"""Figure commands: `figures all` recreates every committed theory figure, default outputs stay
out of the repository's figures/, committed figures are not replaced without --overwrite, the
committed tables redraw, and the command-line core (defaults in help, negative ranges, options
after a sub-job)."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest

from lesde.cli import _GALLERY, _table_spec, build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(REPO, "figures")


@pytest.mark.slow
def test_figures_all_small_recreates_every_committed_theory_figure(tmp_path, capsys):
    out = tmp_path / "all"
    assert main(["figures", "all", "--small", "--out", str(out), "--formats", "png",
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    committed_png = {f[:-4] for f in os.listdir(FIGURES) if f.endswith(".png")}
    committed_csv = {f for f in os.listdir(FIGURES) if f.endswith((".csv", ".spec.json"))}
    made = set(os.listdir(out))
    assert {f"{name}.png" for name in committed_png} <= made
    assert committed_csv <= made
    assert committed_png == {name for name, *_ in _GALLERY}
    for name in committed_png:
        assert (out / f"{name}.png").stat().st_size > 10_000
        assert f"wrote {out / name}.png" in text
    assert "figures all: finished" in text
    # the sweeps are kept (resumable) beside the figures, not in them
    assert (out / "sweeps-small" / "phase_ce_K3" / "table.csv").exists()
    spec = json.loads((out / "phase_ce_K3.spec.json").read_text())["spec"]
    np.testing.assert_allclose(dict(spec["grid"])["alpha"], [0.2, 0.6, 1.0])
    assert spec["replicates"] == 2


def test_figure_command_writes_to_lesde_figures_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["figures", "clouds", "--cases", "1,0.2", "--times", "0,3", "--n", "4",
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    for ext in ("png", "pdf", "svg"):
        path = os.path.join("lesde_figures", f"clouds_ce_K3.{ext}")
        assert os.path.getsize(tmp_path / path) > 1000
        assert f"wrote {path}" in text
    assert "alpha = 1, beta = 0.2: loss" in text  # the headline numbers


def _fake_repository(tmp_path):
    (tmp_path / "lesde").mkdir()
    (tmp_path / "lesde" / "__init__.py").write_text("")
    (tmp_path / "setup.cfg").write_text("")
    (tmp_path / "figures").mkdir()
    png = tmp_path / "figures" / "clouds.png"
    png.write_bytes(b"committed")
    return png


def test_committed_figures_are_not_replaced_without_overwrite(tmp_path, capsys):
    png = _fake_repository(tmp_path)
    args = ["figures", "clouds", "--cases", "1,0.2", "--times", "0,2", "--n", "4", "--formats", "png",
            "--out", str(png)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "committed" in err and "--overwrite" in err and "Traceback" not in err
    assert png.read_bytes() == b"committed"
    assert main(args + ["--overwrite"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    # a new file in figures/ is not a replacement; outside a repository nothing is protected
    assert main(args[:-1] + [str(tmp_path / "figures" / "new.png")]) == 0
    other = tmp_path / "elsewhere" / "figures"
    other.mkdir(parents=True)
    (other / "c.png").write_bytes(b"x")
    assert main(args[:-1] + [str(other / "c.png")]) == 0


def test_figures_all_into_the_repository_refuses_before_any_work(tmp_path, capsys):
    before = {f: os.path.getmtime(os.path.join(FIGURES, f)) for f in os.listdir(FIGURES)}
    rc = main(["figures", "all", "--small", "--only", "clouds_ce_K3,nc_ce_K4", "--out", FIGURES,
               "--sweeps", str(tmp_path / "sweeps")])
    assert rc == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert {f: os.path.getmtime(os.path.join(FIGURES, f)) for f in os.listdir(FIGURES)} == before
    assert main(["figures", "all", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown figure" in capsys.readouterr().err


def test_phase_figure_redraws_a_committed_table(tmp_path, capsys):
    csv = os.path.join(FIGURES, "phase_decay_imodel_K3.csv")
    out = tmp_path / "decay.png"
    assert main(["figures", "phase", csv, "--out", str(out), "--formats", "png", "--theory-c", "5"]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 10_000 and f"wrote {out}" in text
    assert "T = 100: P(separable: NCC accuracy 1)" in text
    # the specification comes from the .spec.json beside the table, else from its columns
    import pandas as pd

    table = pd.read_csv(csv)
    spec = _table_spec(table, csv)
    assert spec["comoving"] is False and spec["sigma"] == 0.1 and spec["replicates"] == 16
    copy = tmp_path / "t.csv"
    shutil.copy(csv, copy)
    guessed = _table_spec(table, str(copy))
    assert [name for name, _ in guessed["grid"]] == [name for name, _ in spec["grid"]] == ["r_alpha"]
    np.testing.assert_allclose(guessed["grid"][0][1], spec["grid"][0][1], rtol=1e-6)  # CSV: 6 digits
    assert guessed["alpha"] == 1.5 and guessed["replicates"] == 16 and guessed["sigma"] == 0.1
    (tmp_path / "t.spec.json").write_text("{}")
    assert main(["figures", "phase", str(copy), "--out", str(out), "--formats", "png"]) == 2
    assert "not a sweep specification" in capsys.readouterr().err


def test_negative_values_and_ranges_are_values():
    p = build_parser()
    args = p.parse_args(["phase", "--gap", "-0.3:0.3:3", "--beta", "-1", "--alpha=-2,1", "-o", "x"])
    assert args.gap == [-0.3, 0.0, 0.3] and args.beta == [-1.0] and args.alpha == [-2.0, 1.0]
    args = p.parse_args(["simulate", "--alpha", "-1,0.5", "--sigma", "-.5", "--seed", "-1"])
    np.testing.assert_array_equal(args.alpha, [-1.0, 0.5])
    assert args.sigma == -0.5 and args.seed == -1
    with pytest.raises(SystemExit):  # a flag takes no value, negative or not
        p.parse_args(["phase", "--no-lp", "-1", "-o", "x"])


def test_negative_gap_sweep_end_to_end(tmp_path, capsys):
    rc = main(["phase", "--gap", "-0.2:0.2:3", "--beta", "0.5", "--times", "4", "--saves", "3",
               "--n", "4", "--replicates", "1", "--no-progress", "-o", str(tmp_path / "s")])
    assert rc == 0 and "finished" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a bad negative range is reported as a bad range
        main(["phase", "--gap", "-0.2:0.2:x", "-o", str(tmp_path / "t")])
    assert "--gap: a range is START:STOP:COUNT of numbers" in capsys.readouterr().err


def test_options_of_a_command_are_accepted_after_its_job():
    p = build_parser()
    for argv in (["elasticity", "torus", "--out", "D", "--seed", "3"],
                 ["elasticity", "--out", "D", "torus", "--seed", "3"],
                 ["elasticity", "--seed", "3", "torus", "--out=D"]):
        args = p.parse_args(argv)
        assert (args.out, args.seed, args.job) == ("D", 3, "torus"), argv
    args = p.parse_args(["elasticity", "--out", "A", "torus", "--out", "B"])
    assert args.out == "B"  # the last one given wins, as anywhere else
    args = p.parse_args(["elasticity", "torus"])
    assert args.out == "elasticity_out" and args.seed == 0 and args.threads is None


def test_help_shows_defaults_and_every_option_of_every_command_has_help(capsys):
    from lesde.cli import _subparsers_of

    with pytest.raises(SystemExit):
        main(["figures", "clouds", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help lines are wrapped
    assert "(default: 0,25,100,400)" in text and "(default: 1,0.2;1,1;0.5,1)" in text
    with pytest.raises(SystemExit):
        main(["elasticity", "torus", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0 2000)" in text and "--out OUT" in text and "(default: elasticity_out)" in text
    # every parser of the tree: each option has help, and a real default is shown in it, once
    missing, unshown, twice, count = [], [], [], 0
    for parser in _walk(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
                continue
            count += 1
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                missing.append(name)
                continue
            shown = formatter._default_text(action)
            text = " ".join(formatter._expand_help(action).split())
            if shown is not None and shown.replace("%%", "%") not in text:
                unshown.append(f"{name}: {text!r} (default {shown})")
            if _default_shown_twice(text, shown):
                twice.append(f"{name}: {text!r}")
    assert count > 150  # the whole tree was walked
    assert not missing, "options without help:\n" + "\n".join(missing)
    assert not unshown, "defaults not shown:\n" + "\n".join(unshown)
    assert not twice, "defaults shown twice:\n" + "\n".join(twice)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _default_shown_twice(text: str, shown) -> bool:
    """Whether a help line states its default twice: the word "default" more than once, or the
    default also as a bare value in parentheses ("resamples (200) (default: 200)", also where the
    two spell the number differently: "(1000)" beside "default: 1000.0")."""
    import re

    if len(re.findall(r"\bdefault", text, re.IGNORECASE)) > 1:
        return True
    if shown is None:
        return False
    shown = shown.replace("%%", "%")
    for value in re.findall(r"(?<![\w)])\(\s*([^()]*?)\s*\)", text):
        if value == shown:
            return True
        if re.fullmatch(_NUMBER, value) and re.fullmatch(_NUMBER, shown) and float(value) == float(shown):
            return True
    return False


def test_the_duplicate_default_check_catches_both_spellings():
    assert _default_shown_twice("bootstrap resamples (200) (default: 200)", "200")
    assert _default_shown_twice("the last iterations (1000) (default: 1000.0)", "1000.0")
    assert _default_shown_twice("table column (default p_sep) (default: p_sep)", "p_sep")
    assert not _default_shown_twice("bootstrap resamples (default: 200)", "200")
    assert not _default_shown_twice("seed of the noise (X(0) uses seed + 1) (default: 0)", "0")
    assert not _default_shown_twice("fraction (0, 1] of the range (default: 0.5)", "0.5")


def _walk(parser):
    """The parser and every sub-parser below it (each once)."""
    from lesde.cli import _subparsers_of

    yield parser
    sub = _subparsers_of(parser)
    if sub is not None:
        for child in dict.fromkeys(sub.choices.values()):
            yield from _walk(child)


def test_commands_say_what_they_wrote_and_that_they_finished(tmp_path, capsys):
    out = tmp_path / "sol.npz"
    assert main(["simulate", "--n", "4", "--T", "2", "--saves", "3", "--no-progress",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "final training cross-entropy" in text  # headline numbers
    assert f"wrote {out}" in text and "lesde simulate: finished in" in text
    # a sweep stopped by --max-chunks says so and does not claim to be finished
    sweep = tmp_path / "s"
    args = ["phase", "--alpha", "0.5,1", "--beta", "0.2", "--times", "2", "--saves", "3", "--n", "4",
            "--replicates", "1", "--chunk-size", "1", "--no-progress", "-o", str(sweep)]
    assert main(args + ["--max-chunks", "1"]) == 0
    text = capsys.readouterr().out
    assert "stopped (resume with the same command)" in text and "lesde phase: finished" not in text
    assert main(args) == 0
    text = capsys.readouterr().out
    for path in ("chunks/", "config.json", "runs.parquet", "table.csv"):
        assert f"{sweep}/{path}" in text, path
    assert "mean P(separable)" in text and "lesde phase: finished in" in text


def _script(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_run_figures_redraw_from_committed_results_alone(tmp_path):
    """The real-run, fit and protocol figures redraw from the committed files (copied here):
    no trajectory store, no data, no training, no refit."""
    fits = _script(os.path.join(FIGURES, "real", "redraw_fit_figures.py"))
    folder = tmp_path / "fit_geomnist_p067"
    shutil.copytree(os.path.join(FIGURES, "real", "fit_geomnist_p067"), folder)
    for f in folder.glob("*.png"):
        f.unlink()
    wrote = fits.redraw(str(folder), ["png"])
    assert {os.path.basename(p) for p in wrote} == {"fit.png", "goodness_of_fit.png",
                                                   "goodness_of_fit_i.png"}
    assert all(os.path.getsize(p) > 10_000 for p in wrote)
    summaries = _script(os.path.join(FIGURES, "paper", "redraw_summary_figures.py"))
    folder = tmp_path / "dense"
    shutil.copytree(os.path.join(FIGURES, "paper", "zhang2021-geomnist-dense"), folder)
    (folder / "summary.png").unlink()
    assert os.path.getsize(summaries.redraw(str(folder), ["png"])) > 10_000
    tail = _script(os.path.join(FIGURES, "real", "geomnist_tail_index.py"))
    rows = tail.read_rows(os.path.join(FIGURES, "real", "geomnist_tail_index.csv"))
    out = tail.plot(rows, str(tmp_path / "tail.png"), formats=("png",))
    assert os.path.getsize(out) > 10_000 and len(rows) == 6
