"""`lesde elasticity` end to end on scikit-learn's digits (no download), at toy sizes: every job
writes its tables with seed spreads and chance levels, tracking runs resume, the comparison with
the released curves reads the shared reference table."""
import json
import os

import pandas as pd
import pytest

from lesde.cli import main

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dan-et-al",
                         "srel_curves.csv")


@pytest.mark.slow
def test_cluster_job_reports_seeds_and_chance(tmp_path):
    out = tmp_path / "cl"
    rc = main(["elasticity", "--out", str(out), "--no-progress", "cluster", "--pairs", "3-5",
               "--per-class", "30", "--aux", "others", "--aux-per-class", "4", "--seeds", "0", "1",
               "--kernel-widths", "inf", "2000", "--trained-width", "16", "--activations", "relu",
               "elephant_spread", "--elephant-a", "0.5", "--bias-spread", "1.0", "--epochs", "3",
               "--lr", "1e-5"])
    assert rc == 0
    per_seed = pd.read_csv(out / "clustering.csv")
    assert set(per_seed["seed"]) == {0, 1}
    summary = pd.read_csv(out / "clustering_summary.csv")
    assert {"accuracy_mean", "accuracy_sd", "seeds", "chance_mean", "chance_sd", "chance_q95"} \
        <= set(summary.columns)
    assert (summary["seeds"] == 2).all()
    assert summary["chance_mean"].iloc[0] == pytest.approx(0.5 + 0.0568, abs=0.01)  # 30 + 30
    nets = set(summary["network"])
    assert {"relu (NTK)", "linear (NTK)", "relu", "elephant_spread", "-"} <= nets
    assert (out / "clustering.png").stat().st_size > 10_000


def test_torus_job_at_initialisation_and_after_training(tmp_path):
    out = tmp_path / "torus"
    rc = main(["elasticity", "--out", str(out), "--no-progress", "torus", "--seeds", "0", "1",
               "--hidden", "64", "--steps", "0", "30", "--activations", "relu", "linear"])
    assert rc == 0
    tab = pd.read_csv(out / "torus_summary.csv")
    assert len(tab) == 4 and set(tab["steps"]) == {0, 30}
    relu0 = tab[(tab["network"] == "relu") & (tab["steps"] == 0)].iloc[0]
    lin0 = tab[(tab["network"] == "linear") & (tab["steps"] == 0)].iloc[0]
    assert relu0["pearson_mean"] < -0.5 and lin0["abscos_mean"] > 0.9


@pytest.mark.slow
def test_track_and_compare_jobs(tmp_path):
    out, work = tmp_path / "trk", tmp_path / "work"
    args = ["elasticity", "--out", str(out), "--no-progress", "track", "--classes", "0", "1", "2",
            "--per-class", "40", "--test-per-class", "10", "--net", "mlp", "--hidden", "16",
            "--probes", "3", "--epochs", "1", "--batch-size", "20", "--every", "2", "--runs", "2",
            "--work", str(work), "--bootstrap", "20"]
    assert main(args) == 0
    summary = json.loads((out / "tracking_summary.json").read_text())
    assert summary["runs"] == 2 and summary["records"] == [3, 3]
    kl = summary["measures"]["kl"]
    assert kl["frac_chance"] == pytest.approx(1 / 3)
    assert len(kl["frac_same_exceeds"]["runs"]) == 2 and len(kl["last_record_band"]) == 2
    assert main(args) == 0                      # finished runs are kept, not redone
    assert main(args[:-4] + ["--run-ids", "1", "--work", str(work), "--bootstrap", "20"]) == 0
    if not os.path.exists(REFERENCE):
        pytest.skip("the released reference curves are not beside the checkout")
    assert main(["elasticity", "--out", str(out), "compare", "--reference", REFERENCE]) == 0
    tab = pd.read_csv(out / "dan_comparison.csv")
    assert {"frac_ours", "frac_ref", "dlr_ours", "dlr_ref", "ratio_ref_sd"} <= set(tab.columns)
    assert set(tab["reference"]) == {"kl", "suhe", "-"}
    assert len(tab[tab["ours"] == "kl_compat"]) == 3


def test_track_on_digits_with_the_default_classes_and_network(tmp_path, capsys):
    """`track --data digits` without --classes: the CIFAR-10 class names of the default are
    replaced by the digits 0 1 2, and the 8 x 8 digits reach the ResNet as 1-channel images."""
    out = tmp_path / "trk"
    rc = main(["elasticity", "--out", str(out), "--no-progress", "track", "--data", "digits",
               "--per-class", "12", "--test-per-class", "5", "--width", "0.0625", "--probes", "2",
               "--epochs", "1", "--batch-size", "12", "--every", "2", "--runs", "1",
               "--work", str(tmp_path / "work"), "--bootstrap", "10"])
    assert rc == 0
    summary = json.loads((out / "tracking_summary.json").read_text())
    assert summary["protocol"]["classes"] == ["0", "1", "2"]
    assert summary["protocol"]["net"] == "resnet18_imagenet"
    assert summary["records"] == [2]   # 3 minibatches of 12: records after minibatches 0 and 2
    with pytest.raises(SystemExit, match="digits 0-9"):
        main(["elasticity", "--out", str(out), "track", "--data", "digits", "--classes", "cat",
              "--work", str(tmp_path / "work")])


def test_matrix_prints_where_it_wrote(tmp_path, capsys):
    out = tmp_path / "mat"
    rc = main(["elasticity", "--out", str(out), "--no-progress", "matrix", "--per-class", "6",
               "--hidden", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    csv_path, png_path = out / "S_relative.csv", out / "S_relative.png"
    assert f"wrote {csv_path}" in printed and str(png_path) in printed
    assert csv_path.stat().st_size > 0 and png_path.stat().st_size > 0


def test_every_elasticity_option_shows_its_default(capsys):
    """The help of every option of every elasticity job names its default (options whose default
    is None, False or empty have none to show)."""
    import argparse

    from lesde.cli import _HelpFormatter, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    ela = sub.choices["elasticity"]
    jobs = next(a for a in ela._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for p in [ela, *jobs.choices.values()]:
        fmt = _HelpFormatter(p.prog)
        for action in p._actions:
            if _HelpFormatter._default_text(action) is None:
                continue
            help_text = fmt._get_help_string(action) % {"default": action.default}
            assert "default" in help_text.lower(), (p.prog, action.option_strings)
            checked += 1
    assert checked > 40


def test_compare_partial_counts_unfinished_runs_from_their_checkpoints(tmp_path):
    """`compare --partial`: a finished run (CSV, 3 records) and an unfinished one (checkpoint, 2
    records) give records 0-1 over both runs and record 2 over the finished one alone; the
    numbers are the runs' own (the mean of the two runs' fractions at record 0)."""
    import numpy as np
    import torch

    if not os.path.exists(REFERENCE):
        pytest.skip("the released reference curves are not beside the checkout")
    out, work = tmp_path / "cmp", tmp_path / "work"
    out.mkdir()
    work.mkdir()

    def rows(n, local):   # kl_compat class-pair means: same-class 1 + local, cross-class 1
        out_rows = []
        for t in range(n):
            row = {"step": 1 + 9 * t, "epoch": (1 + 9 * t) / 58, "train_acc": 0.5, "test_acc": 0.5}
            for k in range(3):
                for l in range(3):
                    row[f"kl_compat_{k}_{l}"] = 1.0 + (local[t] if k == l else 0.0)
            out_rows.append(row)
        return out_rows

    pd.DataFrame(rows(3, [0.1, 0.2, 0.3])).to_csv(out / "run0_tracking.csv", index=False)
    torch.save({"rows": rows(2, [-0.1, 0.2])}, work / "run1_checkpoint.pt")
    assert main(["elasticity", "--out", str(out), "compare", "--reference", REFERENCE]) == 0
    assert len(pd.read_csv(out / "dan_comparison.csv")) == 3       # without --partial: run 0 only
    assert main(["elasticity", "--out", str(out), "compare", "--reference", REFERENCE, "--partial",
                 "--work", str(work)]) == 0
    tab = pd.read_csv(out / "dan_comparison.csv")
    assert tab["runs_ours"].tolist() == [2, 2, 1]
    assert tab["frac_ours"].tolist() == [0.5, 1.0, 1.0]   # run 1 is anti-local at record 0
    np.testing.assert_allclose(tab["dlr_ours"], [0.5 * (2 * np.log(1.1) + 2 * np.log(0.9)),
                                                 2 * np.log(1.2), 2 * np.log(1.3)], atol=1e-4)
