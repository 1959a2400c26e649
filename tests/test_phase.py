"""Phase sweeps: the table, resumability, determinism, Dask, and the physics of the transition."""
import json

import numpy as np
import pandas as pd
import pytest

from lesde.cli import main
from lesde.model import LESDE, Impacts
from lesde.phase import PhaseSpec, _run_chunk, collapse_over_time, load_sweep, run_sweep
from lesde.solvers import initial_state, simulate


def small_spec(**kw):
    base = dict(grid={"alpha": [0.3, 1.0], "beta": [0.3, 1.0]}, K=3, n=10, times=(30.0, 60.0),
                saves=7, dt=0.5, replicates=3, chunk_size=5, seed=7)
    base.update(kw)
    return PhaseSpec(**base)


def test_table_shape_and_columns():
    spec = small_spec()
    table = run_sweep(spec)
    assert len(table) == spec.num_points * len(spec.times) == 8
    assert (table["runs"] == 3).all() and table.attrs["complete"]
    for col in ("point", "alpha", "beta", "T", "notion", "p_sep", "p_sep_se", "p_readout", "p_loss",
                "p_ncc", "p_lp", "p_lp_se", "t_sep_mean", "t_sep_se", "loss_mean", "loss_se",
                "nc1_mean", "nc1_se", "p_overflow"):
        assert col in table.columns, col
    assert set(table["notion"]) == {"readout accuracy 1"}
    assert table["p_sep"].between(0, 1).all()
    se = np.sqrt(table["p_sep"] * (1 - table["p_sep"]) / table["runs"])
    np.testing.assert_allclose(table["p_sep_se"], se)
    # 4 points x 3 replicates = 12 runs in chunks of at most 5
    assert len(spec.chunks()) == 3


def test_spec_validation_and_json_round_trip():
    spec = small_spec(grid={"gap": [-0.5, 0.5], "noise": ["sgd", "both"]}, sigma=0.1)
    again = PhaseSpec.from_dict(json.loads(spec.to_json()))
    assert again == spec and again.digest() == spec.digest()
    pts = spec.points()
    np.testing.assert_allclose(pts["alpha"], pts["beta"] + pts["gap"])
    with pytest.raises(ValueError, match="unknown grid parameter"):
        PhaseSpec(grid={"alpah": [1.0]})
    with pytest.raises(ValueError, match="not both"):
        PhaseSpec(grid={"alpha": [1.0], "gap": [0.1]})
    with pytest.raises(ValueError, match="comoving"):
        PhaseSpec(grid={"alpha": [1.0]}, comoving=True)


def test_resume_gives_the_uninterrupted_table(tmp_path):
    spec = small_spec()
    whole = run_sweep(spec, str(tmp_path / "whole"))
    part = run_sweep(spec, str(tmp_path / "cut"), max_chunks=1)
    assert not part.attrs["complete"]
    assert len(list((tmp_path / "cut" / "chunks").glob("*.parquet"))) == 1
    part = run_sweep(spec, str(tmp_path / "cut"), max_chunks=1)
    assert len(list((tmp_path / "cut" / "chunks").glob("*.parquet"))) == 2
    resumed = run_sweep(spec, str(tmp_path / "cut"))
    assert resumed.attrs["complete"]
    pd.testing.assert_frame_equal(resumed, whole)
    # deterministic: a rerun without a directory, and the table read back from disk
    pd.testing.assert_frame_equal(run_sweep(spec), whole)
    spec2, loaded = load_sweep(str(tmp_path / "cut"))
    assert spec2 == spec
    pd.testing.assert_frame_equal(loaded, whole)
    on_disk = pd.read_csv(tmp_path / "whole" / "table.csv")
    np.testing.assert_allclose(on_disk["p_sep"], whole["p_sep"])
    # another seed gives other runs
    other = run_sweep(small_spec(seed=8))
    assert not np.allclose(other["loss_mean"], whole["loss_mean"])


def test_other_configuration_in_existing_directory_is_an_error(tmp_path):
    run_sweep(small_spec(), str(tmp_path), max_chunks=1)
    with pytest.raises(ValueError, match="different configuration.*replicates"):
        run_sweep(small_spec(replicates=4), str(tmp_path))


@pytest.mark.slow
def test_dask_cluster_gives_the_in_process_table(tmp_path):
    distributed = pytest.importorskip("distributed")
    spec = small_spec(times=(20.0,), saves=3)
    local = run_sweep(spec, threads=1)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        remote = run_sweep(spec, str(tmp_path), client=client)
    pd.testing.assert_frame_equal(remote, local)
    assert len(list((tmp_path / "chunks").glob("*.parquet"))) == len(spec.chunks())


def test_cross_entropy_transition_follows_alpha_vs_beta():
    # SGD sampling noise, K = 3: separable (readout accuracy 1) well inside alpha > beta, never
    # for alpha <= beta; the LP notion is weaker: the reversed features of alpha < beta separate.
    spec = PhaseSpec(grid={"alpha": [0.3, 1.0], "beta": [0.3, 1.0]}, K=3, n=20, times=(200.0,),
                     saves=5, replicates=6, chunk_size=24, seed=1)
    t = run_sweep(spec).set_index(["alpha", "beta"])
    assert t.loc[(1.0, 0.3), "p_sep"] == 1.0 and t.loc[(1.0, 0.3), "loss_mean"] < 0.05
    assert t.loc[(0.3, 1.0), "p_sep"] == 0.0 and t.loc[(0.3, 1.0), "loss_mean"] > 10
    assert t.loc[(0.3, 1.0), "p_lp"] == 1.0          # separable by a reversed classifier
    assert t.loc[(0.3, 0.3), "p_sep"] == 0.0 and t.loc[(1.0, 1.0), "p_sep"] == 0.0
    assert t.loc[(1.0, 1.0), "p_lp"] == 0.0


def test_imodel_transition_follows_alpha_vs_beta():
    # identity drift, additive noise: NCC separability iff alpha > beta (for large enough T)
    spec = PhaseSpec(grid={"alpha": [0.2, 0.8], "beta": [0.2, 0.8]}, drift="identity",
                     noise="additive", sigma=0.1, K=3, n=20, times=(120.0,), saves=4, replicates=6,
                     chunk_size=24, seed=2, comoving=True)
    t = run_sweep(spec).set_index(["alpha", "beta"])
    assert set(t["notion"]) == {"NCC accuracy 1"}
    assert t.loc[(0.8, 0.2), "p_sep"] == 1.0 and t.loc[(0.8, 0.2), "p_lp"] == 1.0
    for a, b in ((0.2, 0.8), (0.2, 0.2), (0.8, 0.8)):
        assert t.loc[(a, b), "p_sep"] == 0.0 and t.loc[(a, b), "p_lp"] == 0.0


def test_comoving_frame_leaves_translation_invariant_measures_unchanged():
    # E' = (alpha - beta)(I - 11^T/K) moves every feature by the same vector as E does
    lab = small_spec(grid={"alpha": [0.9], "beta": [0.3, 0.6]}, drift="identity", noise="additive",
                     sigma=0.2, times=(10.0,), saves=3, chunk_size=6)
    co = PhaseSpec.from_dict({**lab.to_dict(), "comoving": True})
    a, b = _run_chunk(lab.to_dict(), 0), _run_chunk(co.to_dict(), 0)
    np.testing.assert_allclose(a["nc1"], b["nc1"], rtol=1e-6)
    np.testing.assert_array_equal(a["ncc_accuracy"], b["ncc_accuracy"])


def test_collapse_over_time_shapes():
    K, n = 3, 8
    y = np.repeat(np.arange(K), n)
    sde = LESDE(y, Impacts.intra_inter(np.array([1.0, 0.5]), np.array([0.2, 1.0]), K), "cross_entropy",
                noise="sgd", lr=1.0)
    sol = simulate(sde, initial_state(2, K * n, K, std=0.5, seed=0), np.linspace(0, 50, 4), 0.5,
                   seed=1)
    f = collapse_over_time(sol.states, y, runs=["elastic", "reversed"])
    assert len(f) == 4 * 2 and set(f["run"]) == {"elastic", "reversed"}
    last = f[f["time_index"] == 3].set_index("run")
    assert last.loc["elastic", "nc3"] < 0.5 < 3.0 < last.loc["reversed", "nc3"]
    assert last.loc["elastic", "nc4"] == 0.0 and last.loc["reversed", "nc4"] > 0.9


def test_phase_command_and_figure(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["phase", "--alpha", "0.4,1", "--beta", "0.4", "--times", "20", "--saves", "3", "--n", "6",
            "--replicates", "2", "--no-progress", "-o", str(out)]
    assert main(args + ["--max-chunks", "0"]) == 2            # nothing run yet on a new sweep
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "order parameter" in text and (out / "table.csv").exists()
    png = tmp_path / "phase.png"
    assert main(["figures", "phase", str(out), "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
    assert main(args[:-1] + [str(out), "--seed", "3"]) == 2  # other config, same directory
    assert "different configuration" in capsys.readouterr().err


def test_overflowing_runs_are_counted_not_scored():
    # the lab-frame I-model with large impacts overflows float64: such runs are reported in
    # p_overflow and left out of the probabilities instead of counting as "not separable"
    spec = PhaseSpec(grid={"alpha": [0.1, 300.0]}, beta=0.0, drift="identity", noise="additive",
                     sigma=0.1, K=3, n=5, times=(100.0,), saves=3, replicates=2, seed=3)
    t = run_sweep(spec).set_index("alpha")
    assert t.loc[300.0, "p_overflow"] == 1.0 and np.isnan(t.loc[300.0, "p_sep"])
    assert t.loc[0.1, "p_overflow"] == 0.0 and t.loc[0.1, "p_sep"] == 1.0
