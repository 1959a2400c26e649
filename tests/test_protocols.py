"""Tests of lesde.protocols and ``lesde reproduce``: the published protocols as specs, trials
run and resumed over processes, the summaries, the read-out log, states rebuilt at any step."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from lesde.cli import main
from lesde.fit import (IEstimator, RegressionEstimator, ShootingEstimator, Trajectory,
                       as_trajectory, tail_index)
from lesde.nets import LeNet
from lesde.protocols import (
    PROTOCOLS,
    Protocol,
    get_protocol,
    load_head_log,
    load_protocol,
    load_snapshot,
    protocol_state,
    protocol_trials,
    run_protocol,
    summarize_protocol,
    write_protocol_summary,
)
from lesde.tracking import TrainConfig, load_store, train_and_track
from lesde.tracking import _DataOrder

# a GeoMNIST protocol run small enough for a unit test
TINY = dict(steps=12, log_every=4, train_per_class=6, val_per_class=4, track_per_class=3,
            track_test_per_class=2, eval_test_size=-1, impacts_every=6, impacts_per_class=2,
            checkpoint_every=6)


def test_registered_protocols_are_the_papers():
    g = PROTOCOLS["zhang2021-geomnist"]
    c = g.config
    assert (c.net, c.dtype, c.batch_size, c.sampling, c.optimizer) == \
        ("lenet", "float64", 1, "replacement", "sgd")
    assert (c.lr, c.steps, c.momentum, c.weight_decay) == (0.005, 10_000, 0.0, 0.0)
    assert (g.train_per_class, g.val_per_class, g.dataset) == (500, 500, "geomnist")
    assert g.p_errs == (0.0, 0.3, 2.0 / 3.0) and g.paper_trials == 100 and g.trials >= 10
    f = PROTOCOLS["zhang2021-cifar10"]
    c = f.config
    assert (c.net, c.dtype, c.batch_size, c.sampling, c.lr, c.steps) == \
        ("lenet", "float64", 1, "replacement", 0.001, 30_000)
    assert f.classes == ("airplane", "automobile", "bird") and c.net_kwargs["in_channels"] == 3
    assert (f.train_per_class, f.val_per_class) == (2000, 500) and f.trials >= 5
    r = PROTOCOLS["cifar10-resnet18-k10"]
    assert r.config.num_classes == 10 and len(r.classes) == 10 and r.train_per_class >= 2000
    assert r.record_head and r.config.net_kwargs["width"] == 0.25
    for p in PROTOCOLS.values():                                    # JSON round trip
        assert Protocol.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("zhang2022")


def test_lenet_is_the_authors_simpleconv():
    """Their SimpleConv: conv 6@5x5 (1 input channel), pool 2, conv 16@5x5, pool 2, FC
    400-120, 120-84, 84-K; parameter counts per layer from that description."""
    net = LeNet(3, in_channels=1)
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120),
                      (84,), (3, 84), (3,)]
    assert sum(p.numel() for p in net.parameters()) == 156 + 2416 + 48120 + 10164 + 255
    x = torch.randn(2, 1, 32, 32)
    f, z = net.forward_features(x)
    assert f.shape == (2, 84) and z.shape == (2, 3) and torch.all(f >= 0)


def test_overrides_and_bad_input():
    g = get_protocol("zhang2021-geomnist")
    short = g.with_overrides(steps=300, log_every=20, trials=2, p_errs=[0.667])
    assert short.config.steps == 300 and short.config.log_every == 20 and short.trials == 2
    assert short.p_errs == (2.0 / 3.0,) and short.config.lr == g.config.lr
    r = get_protocol("cifar10-resnet18-k10").with_overrides(steps=5)
    assert r.config.steps == 5 and r.config.epochs == 0.0
    with pytest.raises(ValueError, match="unknown protocol or TrainConfig fields: bogus"):
        g.with_overrides(bogus=1)
    with pytest.raises(ValueError, match="only defined here for GeoMNIST"):
        get_protocol("zhang2021-cifar10").with_overrides(p_errs=(0.3,))
    with pytest.raises(ValueError, match="p_err"):
        run_protocol(g, "unused-dir", p_errs=[1.5], **TINY)
    with pytest.raises(ValueError, match="sampling"):
        TrainConfig(net="lenet", num_classes=3, steps=1, sampling="bootstrap")


def test_sampling_with_replacement_is_uniform_and_resumable():
    order = _DataOrder(10, 1, seed=3, replacement=True)
    draws = torch.cat([order.next_batch() for _ in range(5000)]).numpy()
    counts = np.bincount(draws, minlength=10)
    # multinomial(5000, 1/10): sd sqrt(5000 * 0.1 * 0.9) = 21.2 per count; 5 sd
    assert np.all(np.abs(counts - 500) < 5 * 21.2)
    first10 = draws[:10]
    assert len(set(first10.tolist())) < 10 or len(set(draws[10:20].tolist())) < 10  # repeats
    # state round trip continues the same sequence
    a = _DataOrder(10, 2, seed=4, replacement=True)
    a.next_batch()
    b = _DataOrder(10, 2, seed=99, replacement=True)
    b.load(a.state())
    assert all(torch.equal(a.next_batch(), b.next_batch()) for _ in range(5))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("proto") / "geo")
    recs = run_protocol("zhang2021-geomnist", out, trials=2, p_errs=[0.0, 0.3], progress=False,
                        **TINY)
    return out, recs


def test_run_protocol_trials_stores_and_resume(tiny_run, tmp_path):
    out, recs = tiny_run
    assert [(r["p_err"], r["trial"]) for r in recs] == [(0.0, 0), (0.0, 1), (0.3, 0), (0.3, 1)]
    assert all(r["complete"] and r["wall_seconds"] > 0 for r in recs)
    found = protocol_trials(out)
    assert list(found) == ["p000", "p030"] and all(len(v) == 2 for v in found.values())
    st0, st1 = (load_store(s) for s in found["p000"])
    assert st0.config.seed == 0 and st1.config.seed == 1 and st0.config.steps == 12
    assert st0.config.sampling == "replacement" and st0.config.dtype == "float64"
    assert not np.array_equal(st0.array("logits"), st1.array("logits"))   # other seeds
    np.testing.assert_array_equal(st0.step, np.arange(0, 13, 4))
    # the validation labels are clean, the training labels noisy at p_err 0.3
    proto = load_protocol(out)
    (xtr, ytr), (xva, yva) = proto.data(0.3)
    assert (ytr.numpy() != np.repeat([0, 1, 2], 6)).sum() == 6
    np.testing.assert_array_equal(yva.numpy(), np.repeat([0, 1, 2], 4))
    # running again is a resume: finished trials are not run again
    again = run_protocol("zhang2021-geomnist", out, trials=2, p_errs=[0.0, 0.3],
                         progress=False, **TINY)
    assert [r["wall_seconds"] for r in again] == [r["wall_seconds"] for r in recs]
    # other overrides in the same directory are refused
    with pytest.raises(ValueError, match="another protocol"):
        run_protocol("zhang2021-geomnist", out, trials=1, progress=False,
                     **dict(TINY, steps=13))


def test_interrupted_trial_resumes_to_the_same_store(tiny_run, tmp_path):
    out, _ = tiny_run
    proto = load_protocol(out)
    cfg = proto.trial_config(1)
    tr, va = proto.data(0.0)
    path = str(tmp_path / "resumed")
    train_and_track(cfg, tr, va, path, progress=False, until_step=7)
    train_and_track(cfg, tr, va, path, progress=False)
    ref = load_store(protocol_trials(out)["p000"][1])
    got = load_store(path)
    np.testing.assert_array_equal(got.array("logits"), ref.array("logits"))
    np.testing.assert_array_equal(got.array("test_acc"), ref.array("test_acc"))


def test_parallel_workers_give_the_same_trials(tiny_run, tmp_path):
    out, _ = tiny_run
    par = str(tmp_path / "par")
    run_protocol("zhang2021-geomnist", par, trials=2, p_errs=[0.0], workers=2,
                 progress=False, **TINY)
    for a, b in zip(protocol_trials(out)["p000"], protocol_trials(par)["p000"]):
        np.testing.assert_array_equal(load_store(a).array("logits"),
                                      load_store(b).array("logits"))


def test_summary_and_first_look(tiny_run, tmp_path):
    out, _ = tiny_run
    s = summarize_protocol(out)
    rec = s["p000"]
    assert rec["test_acc"].shape == (2, 4) and rec["class_mean_logits_train"].shape == (2, 4, 3, 3)
    assert rec["E"].shape == (2, 3, 3, 3) and rec["alpha_hat"].shape == (2, 3)
    st = load_store(protocol_trials(out)["p000"][0])
    np.testing.assert_allclose(rec["class_mean_logits_train"][0], st.class_means("logits"),
                               rtol=1e-6)
    est = IEstimator(on_reversed="nan", n_bootstrap=0).fit(as_trajectory(st))
    np.testing.assert_allclose(rec["A"][0], est.A_)
    # pooled: the I-estimator on the class means averaged over the trials
    means = rec["class_mean_logits_train"].astype(np.float64).mean(0)
    pooled = IEstimator(on_reversed="nan", n_bootstrap=0).fit((rec["time"], means, np.arange(3)))
    np.testing.assert_allclose(rec["A_pooled"], pooled.A_)
    files = write_protocol_summary(out, str(tmp_path / "sum"))
    names = sorted(os.path.basename(f) for f in files)
    assert names == ["p000_metrics.csv", "p000_summary.npz", "p030_metrics.csv",
                     "p030_summary.npz", "protocol.json", "summary.md", "summary.png",
                     "trials.csv"]
    text = open(tmp_path / "sum" / "summary.md").read()
    assert "chance: accuracy 0.333" in text and "| p030 | 2 | 12 |" in text
    rows = open(tmp_path / "sum" / "trials.csv").read().splitlines()
    assert len(rows) == 5 and rows[0].startswith("setting,trial,train_loss")


def test_head_log_reproduces_the_logits_and_survives_a_resume(tmp_path):
    """W(t), b(t) at every logged step: logits = features W^T + b at each one, step 0
    included (the head rebuilt from the seed), also after an interrupted run."""
    from lesde.protocols import _HeadLog

    proto = get_protocol("zhang2021-geomnist").with_overrides(**TINY)
    cfg = proto.trial_config(0)
    tr, va = proto.data(0.0)
    path = str(tmp_path / "s")
    head = _HeadLog(path, cfg, 12)
    train_and_track(cfg, tr, va, path, progress=False, callback=head, until_step=8)
    head.save()
    head = _HeadLog(path, cfg, 12)            # a new process resumes from the checkpoint (6)
    train_and_track(cfg, tr, va, path, progress=False, callback=head)
    log = load_head_log(path)
    st = load_store(path)
    np.testing.assert_array_equal(log["step"], st.step)
    f, z = st.array("features"), st.array("logits")
    np.testing.assert_allclose(np.einsum("tmp,tkp->tmk", f, log["W"]) + log["b"][:, None],
                               z, rtol=1e-10, atol=1e-12)
    with pytest.raises(FileNotFoundError, match="head log"):
        load_head_log(str(tmp_path))


def test_protocol_state_rebuilds_the_logged_state(tiny_run):
    out, _ = tiny_run
    model, opt, (tr, va), info = protocol_state(out, "p030", 1, 8)
    assert info["source"] == "rerun" and info["max_logit_diff"] == 0.0
    assert isinstance(opt, torch.optim.SGD) and next(model.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="setting names"):
        protocol_state(out, "zero", 0, 4)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_snapshots_are_read_with_weights_only(tmp_path):
    out = str(tmp_path / "snap")
    run_protocol("zhang2021-geomnist", out, trials=1, p_errs=[0.0], progress=False,
                 snapshot_every=6, **TINY)
    store = protocol_trials(out)["p000"][0]
    model, opt, cfg = load_snapshot(store, 6)
    assert cfg.steps == 12
    _, _, _, info = protocol_state(out, "p000", 0, 6)
    assert info["source"] == "snapshot"
    with pytest.raises(FileNotFoundError, match="no snapshot at step 5"):
        load_snapshot(store, 5)
    # a snapshot file holding anything but tensors and plain data is refused
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(store, "snapshots", "step_000005.pt"), "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_snapshot(store, 5)


def test_cli_reproduce_list_run_and_summary(tmp_path, capsys):
    assert main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PROTOCOLS)
    out = str(tmp_path / "cli")
    args = ["reproduce", "zhang2021-geomnist", out, "--trials", "1", "--p-err", "0.667",
            "--steps", "8", "--log-every", "4", "--no-progress", "--summary",
            str(tmp_path / "sum")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "p067/trial_000: test_acc" in text and "wrote 6 files" in text
    assert os.path.exists(tmp_path / "sum" / "p067_summary.npz")
    assert main(args) == 0                                  # a finished run is not redone
    # the tracked set (100 per class) is larger than 5 images per class: a clear error
    bad = ["reproduce", "zhang2021-geomnist", str(tmp_path / "bad"), "--trials", "1",
           "--steps", "8", "--train-per-class", "5", "--no-progress"]
    assert main(bad) == 2
    assert "fewer than the 100 asked for" in capsys.readouterr().err
    assert main(["reproduce", "zhang2021-geomnist"]) == 2


@pytest.mark.slow
def test_paper_protocol_end_to_end(tmp_path):
    """The paper's GeoMNIST protocol (500 + 500 images per class, LeNet float64, SGD batch 1
    with replacement, lr 0.005) for 300 iterations, two trials: trained, logged, summarised,
    and fitted, the two trials stacked as trials of one fit: the I-estimator, the regression, and
    the default trajectory-matching fit (ShootingEstimator) with bands over the trials, and both
    tail indices."""
    out = str(tmp_path / "paper")
    recs = run_protocol("zhang2021-geomnist", out, trials=2, p_errs=[0.0], progress=False,
                        steps=300, log_every=20)
    assert len(recs) == 2 and all(r["complete"] for r in recs)
    stores = protocol_trials(out)["p000"]
    st = load_store(stores[0])
    assert len(st) == 16 and st.labels.shape == (600,)
    assert st.array("features").shape == (16, 600, 84) and st.array("logits").dtype == np.float64
    m = st.metrics()
    assert np.all(np.isfinite(m["test_loss"])) and abs(m["test_loss"][0] - np.log(3)) < 0.05
    traj = as_trajectory(stores)                       # the trials as R = 2 trials of one fit
    assert traj.features.shape == (2, 16, 300, 3)
    i_est = IEstimator(on_reversed="nan", n_bootstrap=20).fit(traj)
    assert np.isfinite(i_est.A_[-1]) and i_est.bands_["A"].shape == (2, 16)
    reg = RegressionEstimator(field="cross_entropy").fit(traj)
    assert np.all(np.isfinite(reg.alpha_)) and np.all(np.isfinite(reg.beta_))
    # the default estimator on a thinned log (as figures/paper/fits.py does): 10 tracked samples
    # per class, every other logged time, both trials in one fit, bands from the trials
    sel = np.concatenate([np.flatnonzero(traj.labels == c)[:10] for c in range(3)])
    small = Trajectory(traj.ts[::3], traj.features[:, ::3][:, :, sel], traj.labels[sel])
    shoot = ShootingEstimator(knots=3, bootstrap="trials", n_bootstrap=10, max_iter=50)
    with warnings.catch_warnings():          # alpha + 2 beta may be weakly identified this early
        warnings.simplefilter("ignore", UserWarning)
        shoot.fit(small)
    assert shoot.n_trials_ == 2 and shoot.alpha_.shape == (6,)
    assert np.all(np.isfinite(shoot.A_)) and np.all(np.isfinite(shoot.B_))
    lo, hi = shoot.bands_["A"]
    assert np.all(lo <= hi) and lo.shape == (6,)
    assert np.all(np.isfinite(shoot.bands_["alpha"])) and shoot.band_method_ == "trials"
    assert shoot.sde().K == 3                # the fitted SDE, ready to simulate (Fig. 5)
    for kind, kw in (("paper", {"time_scale": 1 / 0.005, "time_offset": 1.0}), ("integral", {})):
        r = tail_index(shoot.ts_, np.abs(shoot.A_) + 1e-12, kind=kind, **kw)
        assert np.isfinite(r["r"])
    files = write_protocol_summary(out, str(tmp_path / "summary"))
    assert any(f.endswith("summary.md") for f in files)


def test_cli_reconcile_writes_the_decomposition(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    dest = str(tmp_path / "rec")
    code = main(["reconcile", out, "--setting", "p000", "--trial", "0", "--step", "8",
                 "--intervals", "1,2", "--replicas", "4", "--probe-per-class", "2",
                 "--variants", "as-trained", "lr/10", "--no-progress", "--out", dest])
    assert code == 0
    base = os.path.join(dest, "geo_p000_trial0_step8")
    meta = json.load(open(base + ".json"))
    assert meta["state_source"] == "rerun" and meta["max_logit_diff"] == 0.0
    assert len(meta["decomposition"]) == 2 * 2 * 2          # variants x intervals x quantities
    rows = open(base + ".csv").read().splitlines()
    assert rows[0].startswith("velocity,steps,t,alpha,beta,contrast")
    assert "| lr/10 | 2 | alpha |" in open(base + ".md").read()
    assert main(["reconcile", out, "--step", "8", "--intervals", "0", "--out", dest]) == 2
