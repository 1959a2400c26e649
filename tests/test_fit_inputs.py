"""Any log in: .npz logs, `lesde simulate` files and stores through `as_trajectory` and
`lesde fit`, with a clear error for everything else; the round trip through the command line;
the held-out model table; bad `lesde fit` arguments fail before any work."""
import json
import pickle

import numpy as np
import pytest

from lesde import model as m
from lesde.cli import main
from lesde.fit import (ShootingEstimator, Trajectory, as_trajectory, compare_models,
                       goodness_of_fit)
from lesde.solvers import simulate

K = 3


def _log(n=20, T=13, R=1, seed=0, sigma=0.05):
    y = np.tile(np.arange(K), n)
    rng = np.random.default_rng(seed)
    x0 = np.array([1.5, 0.0, -1.0]) + 0.5 * rng.standard_normal((R, y.size, K))
    ts = np.linspace(0, 6, T)
    sol = simulate(m.LESDE(y, m.Impacts.intra_inter(5.0, 1.25, K), "cross_entropy",
                           sigma=sigma), x0, ts, 0.005, seed=seed)
    return ts, np.swapaxes(sol.states, 0, 1), y


def test_npz_log_and_solution_file(tmp_path):
    ts, x, y = _log(R=2)
    np.savez(tmp_path / "log.npz", features=x, labels=y, ts=ts)
    tr = as_trajectory(str(tmp_path / "log.npz"))
    assert tr.features.shape == (2, 13, 60, 3) and np.allclose(tr.ts, ts)
    np.savez(tmp_path / "one.npz", features=x[0], labels=y, ts=ts)
    assert as_trajectory(str(tmp_path / "one.npz")).R == 1
    # the array may be named after `what` and the times `time`; a split selects samples
    split = np.r_[np.zeros(45, np.int8), np.ones(15, np.int8)]
    np.savez(tmp_path / "alt.npz", logits=x[0], labels=y, time=ts, split=split)
    tr = as_trajectory(str(tmp_path / "alt.npz"), split="test")
    assert tr.N == 15 and np.array_equal(tr.labels, y[45:])
    # a lesde simulate solution: its runs are trials
    sol = simulate(m.LESDE(y, m.Impacts.intra_inter(1.0, 0.2, K), "cross_entropy", sigma=0.1),
                   x[:, 0], ts, 0.05, seed=0)
    sol.save(tmp_path / "sol.npz")
    tr = as_trajectory(str(tmp_path / "sol.npz"))
    assert tr.R == 2 and np.allclose(tr.features[1], sol.states[:, 1])


@pytest.mark.parametrize("arrays, match", [
    (dict(labels=np.zeros(3), ts=np.arange(2.0)), "lacks features"),
    (dict(features=np.zeros((2, 3, 2)), labels=np.zeros(3)), r"lacks ts \(or time\)"),
    (dict(features=np.zeros((2, 3, 2)), ts=np.arange(2.0)), "lacks labels"),
    (dict(features=np.zeros((2, 4, 3)), labels=[0, 1, 2], ts=[0.0, 1.0]),
     r"labels must have shape \(N,\) = \(4,\)"),                       # mismatched labels
    (dict(features=np.full((2, 6, 3), np.nan), labels=[0, 1, 2] * 2, ts=[0.0, 1.0]),
     "non-finite"),                                                    # a log with NaNs
    (dict(features=np.zeros((1, 6, 3)), labels=[0, 1, 2] * 2, ts=[0.0]),
     "at least one interval"),                                         # one logged time
    (dict(features=np.zeros((2, 6, 3)), labels=["a", "b", "c"] * 2, ts=[0.0, 1.0]),
     "labels must be integers|could not convert"),
])
def test_bad_npz_logs(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        as_trajectory(str(tmp_path / "bad.npz"))


def test_untrusted_files_are_not_unpickled(tmp_path):
    """An .npz whose array is a pickled object is refused (np.load with allow_pickle=False): the
    object's code never runs."""
    ran = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    obj = np.empty(1, dtype=object)
    obj[0] = Evil()
    np.savez(tmp_path / "evil.npz", features=obj, labels=np.zeros(1), ts=np.arange(2.0))
    with pytest.raises(ValueError, match="never unpickles|Object arrays"):
        as_trajectory(str(tmp_path / "evil.npz"))
    assert not ran.exists()
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="not a readable .npz"):
        as_trajectory(str(tmp_path / "evil.pkl"))
    assert not ran.exists()
    with pytest.raises(FileNotFoundError, match="no log at"):
        as_trajectory(str(tmp_path / "missing.npz"))


def test_a_store_with_nans_is_an_error(tmp_path):
    """A logged run whose logits hold NaN (written by other code: training itself stops on a NaN
    loss): one clear error, from the API and from `lesde fit`, that names where."""
    import torch
    import zarr

    from lesde.tracking import TrainConfig, train_and_track

    g = torch.Generator().manual_seed(0)
    y = torch.arange(K).repeat(10)
    x = torch.randn(30, 4, generator=g)
    cfg = TrainConfig(net="mlp", num_classes=K, net_kwargs={"in_dim": 4, "hidden": [8]},
                      lr=0.1, batch_size=1, steps=40, log_every=10, track_per_class=5, seed=0)
    store = train_and_track(cfg, (x, y), store=str(tmp_path / "run"), progress=False)
    assert np.all(np.isfinite(store.array("logits")))
    arr = zarr.open_group(str(tmp_path / "run"), mode="r+")["logits"]
    block = np.asarray(arr[2])
    block[3, 1] = np.nan
    arr[2] = block
    with pytest.raises(ValueError, match="non-finite values"):
        as_trajectory(str(tmp_path / "run"))
    assert main(["fit", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2


def test_lesde_fit_bad_arguments_fail_before_work(tmp_path, capsys):
    ts, x, y = _log()
    np.savez(tmp_path / "log.npz", features=x, labels=y, ts=ts)
    for args, match in ((["--tail", "0"], "--tail must be a fraction"),
                        (["--tail", "1.5"], "--tail must be a fraction"),
                        (["--n-bootstrap", "-1"], "--n-bootstrap must be"),
                        (["--level", "95"], "--level must be"),
                        (["--jobs", "0"], "--jobs must be"),
                        (["--knots", "0"], "--knots must be"),
                        (["--estimators", "shooting,x"], "--estimators: unknown"),
                        (["--compare", "1"], "--compare must be"),
                        (["--gof-paths", "1"], "--gof-paths must be")):
        out = tmp_path / "never"
        rc = main(["fit", str(tmp_path / "log.npz"), "--out", str(out)] + args)
        err = capsys.readouterr().err
        assert rc == 2 and match in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists()
    rc = main(["fit", str(tmp_path / "nothing.npz"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no log at" in capsys.readouterr().err


def _simulate_file(path, drift, alpha, beta):
    """`lesde simulate`: 4 runs of 30 samples per class from X(0) ~ N(0, 0.25 I), so every run
    starts from (nearly) the same class means, logged at 13 times over [0, 6]."""
    assert main(["simulate", "--K", "3", "--n", "30", "--alpha", str(alpha), "--beta", str(beta),
                 "--drift", drift, "--noise", "additive", "--sigma", "0.05", "--T", "6",
                 "--dt", "0.005", "--saves", "13", "--runs", "4", "--init-std", "0.5",
                 "--no-progress", "-o", str(path)]) == 0


@pytest.mark.slow
def test_round_trip_simulate_then_fit(tmp_path, capsys):
    """`lesde simulate` with known impacts in a setting that identifies alpha and beta (the I
    field: the class means' grand mean grows at rate (alpha + 2 beta)/3 and their differences
    at (alpha - beta)/3, and random initial means excite both), then `lesde fit` on its file,
    which takes the drift from the file: alpha and beta lie inside their 95% sandwich bands
    (each misses with probability 0.05, so both cover with probability >= 0.9 for this fixed
    seed), and the bands are narrow (under 5% of alpha: a band of the non-identified
    cross-entropy case below is about 140 wide). The command prints them, the model table and
    every file it wrote."""
    sol = tmp_path / "sim.npz"
    _simulate_file(sol, "identity", 1.0, 0.3)
    capsys.readouterr()
    out = tmp_path / "fit"
    assert main(["fit", str(sol), "--out", str(out), "--time", "constant", "--bootstrap",
                 "sandwich", "--compare", "0.5", "--compare-paths", "8"]) == 0
    text, err = capsys.readouterr()
    assert "not identified" not in err
    summ = json.loads((out / "summary.json").read_text())
    assert summ["field"] == "identity"
    sh = summ["estimators"]["shooting"]
    assert sh["row_shift_identified"] and sh["identified"]
    lo_a, hi_a = np.array(sh["alpha_band"])[:, 0]
    lo_b, hi_b = np.array(sh["beta_band"])[:, 0]
    assert lo_a <= 1.0 <= hi_a and lo_b <= 0.3 <= hi_b, sh
    assert hi_a - lo_a < 0.05 and hi_b - lo_b < 0.05, sh          # the bands are informative
    assert "alpha" in text and "dAIC" in text and str(out / "summary.json") in text
    for f in ("shooting.csv", "fit.png", "model_table.md", "summary.json"):
        assert (out / f).is_file() and str(out / f) in text
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]   # no temporaries
    rows = {r["model"]: r for r in summ["model_comparison"]["rows"]}
    assert set(rows) == {"I", "L", "CE", "CE+additive"}
    assert rows["I"]["r2_means"] > 0.9 and rows["I"]["r2_means"] > rows["CE"]["r2_means"]


@pytest.mark.slow
def test_round_trip_cross_entropy_identifies_only_the_gap(tmp_path, capsys):
    """The cross-entropy field from shared initial class means: each class's mean G sums to
    zero over the logits, and with equal logit biases sum_k w_k Gbar_k stays near zero, so
    alpha + 2 beta is not identified. `lesde fit` warns, gives alpha and beta honestly wide
    bands, and the gap alpha - beta a narrow band that covers the truth 3.75."""
    sol = tmp_path / "sim.npz"
    _simulate_file(sol, "cross_entropy", 5.0, 1.25)
    capsys.readouterr()
    out = tmp_path / "fit"
    with pytest.warns(UserWarning, match=r"alpha \+ \(K-1\) beta is not identified"):
        assert main(["fit", str(sol), "--out", str(out), "--time", "constant", "--bootstrap",
                     "sandwich", "--compare", "0"]) == 0
    text = capsys.readouterr().out
    assert "the gap alpha - beta is" in text
    sh = json.loads((out / "summary.json").read_text())["estimators"]["shooting"]
    assert not sh["row_shift_identified"] and not sh["identified"]
    lo_g, hi_g = np.array(sh["gap_band"])[:, 0]
    assert lo_g <= 3.75 <= hi_g and hi_g - lo_g < 0.2, sh
    for name, truth in (("alpha", 5.0), ("beta", 1.25)):
        lo, hi = np.array(sh[f"{name}_band"])[:, 0]
        assert lo <= truth <= hi and hi - lo > 20.0, (name, sh)   # wide, never narrow and wrong


def test_goodness_of_fit_takes_the_model_from_the_estimator():
    ts, x, y = _log(n=15, T=9)
    tr = Trajectory(ts, x, y)
    est = ShootingEstimator("cross_entropy", time="constant", bootstrap="sandwich").fit(tr)
    gof = goodness_of_fit(tr, est, n_paths=8)
    assert gof.model["field"] == "cross_entropy" and gof.model["noise"] == est.noise_kind_
    assert gof.r2 > 0.9, gof
    with pytest.raises(ValueError, match="does not match the field"):
        goodness_of_fit(tr, est, field="identity", n_paths=4)
    with pytest.raises(ValueError, match="swapped"):
        goodness_of_fit(est, tr)
    with pytest.raises(TypeError):
        goodness_of_fit(tr, est, "identity")                     # options are keyword-only
    assert repr(gof).startswith("GoodnessOfFit(R2=")


def test_held_out_model_table():
    """A cross-entropy log with additive noise: the models with the cross-entropy drift predict
    the held-out half far better than the I and L models, and AIC ranks a cross-entropy model
    first."""
    ts, x, y = _log(n=20, T=17, sigma=0.05)
    table = compare_models(Trajectory(ts, x, y), n_paths=8,
                           estimator_kwargs={"time": "constant"})
    rows = {r["model"]: r for r in table.rows}
    assert set(rows) == {"I", "L", "CE", "CE+additive"}
    assert rows["CE+additive"]["r2_means"] > 0.8
    assert rows["CE+additive"]["r2_means"] > rows["I"]["r2_means"]
    assert table.best("aic") in ("CE", "CE+additive")
    text = str(table)
    assert "R2 means" in text and "dAIC" in text and "CE+additive" in text
