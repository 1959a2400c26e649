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
