"""Reliability: shared files cannot run code, one writer per store and sweep folder, damaged or
partial stores and foreign sweep chunks are refused, overflow is never scored as "not
separable", memory is checked before allocating, training stops on NaN, writes are atomic."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lesde import metrics
from lesde.cli import main
from lesde.model import LESDE, Impacts
from lesde.phase import PhaseSpec, load_sweep, run_sweep
from lesde.resources import InsufficientMemoryError
from lesde.solvers import Solution, initial_state, simulate
from lesde.storage import DirectoryLock, DirectoryLockedError, UnsafeFileError, atomic_write
from lesde.tracking import (PartialStoreError, StoreDamagedError, TrainConfig, TrainingDivergedError,
                            TrajectoryStore, load_store, train_and_track)

K, D = 3, 8


def _blobs(n_per_class, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, D, generator=g, dtype=torch.float64) * 1.5
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), D, generator=g, dtype=torch.float64)
    return x.float(), y


@pytest.fixture(scope="module")
def data():
    return _blobs(12, 0), _blobs(6, 1)


def _config(**kw):
    base = dict(net="mlp", num_classes=K, net_kwargs={"in_dim": D, "hidden": [8]}, lr=0.05,
                batch_size=4, steps=12, log_every=3, track_per_class=3, track_test_per_class=1,
                seed=1, dtype="float64", checkpoint_every=4)
    base.update(kw)
    return TrainConfig(**base)


def _arrays(store):
    return {n: store.array(n) for n in ("features", "logits", "step", "time", "train_loss",
                                        "train_acc", "test_loss", "test_acc", "labels")}


class _Stop(Exception):
    pass


def _stop_at(n):
    def cb(step, model, optimizer):
        if step == n:
            raise _Stop

    return cb


# ============================================================================================
# a shared store must not run code
# ============================================================================================
class _RunsCommand:
    """Unpickling this object runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _plant_malicious_checkpoint(store_path, marker):
    """Replace the store's checkpoint by a file whose pickle creates ``marker``, keeping the
    metadata a resume checks (config and step), and mark the run unfinished so it resumes."""
    import zarr

    store = load_store(store_path)
    evil = {"checkpoint_format": 2, "config": store.config.to_dict(), "step": 4,
            "model": _RunsCommand(f"touch {marker}")}
    torch.save(evil, os.path.join(store_path, "checkpoint.ckpt"))
    zarr.open_group(str(store_path), mode="r+").attrs["complete"] = False


def test_crafted_checkpoint_is_refused_and_does_not_run(data, tmp_path):
    train, test = data
    cfg = _config()
    store = tmp_path / "shared_store"
    train_and_track(cfg, train, test, store, progress=False)
    marker = tmp_path / "command_ran"
    _plant_malicious_checkpoint(store, marker)

    # (a) resuming through the API
    with pytest.raises(UnsafeFileError, match=r"refused to load checkpoint .*checkpoint\.ckpt.*"
                                              r"could run code"):
        train_and_track(cfg, train, test, store, progress=False)
    assert not marker.exists()
    # (b) loading the model of the store
    with pytest.raises(UnsafeFileError, match="checkpoint.ckpt"):
        load_store(store).load_model()
    assert not marker.exists()
    # the lock was released: the store is not left locked by the refused run
    assert not (store / "lesde.lock").exists()
    # control: the file is a working exploit for an unrestricted unpickler
    torch.load(store / "checkpoint.ckpt", weights_only=False)
    assert marker.exists()


def test_crafted_checkpoint_is_refused_by_the_command_line(tmp_path):
    store = tmp_path / "store"
    args = ["train", str(store), "--data", "geomnist", "--per-class", "6", "--test-per-class", "3",
            "--net", "mlp", "--net-kwargs", '{"hidden": [8]}', "--lr", "0.05", "--momentum", "0",
            "--batch-size", "3", "--steps", "6", "--log-every", "2", "--track", "2",
            "--track-test", "1", "--checkpoint-every", "2", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    marker = tmp_path / "command_ran"
    _plant_malicious_checkpoint(store, marker)
    proc = subprocess.run([sys.executable, "-m", "lesde.cli"] + args, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "refused to load checkpoint" in proc.stderr and "checkpoint.ckpt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_old_checkpoints_with_numpy_rng_states_still_load(data, tmp_path):
    # checkpoints written before this format held numpy arrays and tuples; they are rebuilt
    # without running code
    train, test = data
    cfg = _config()
    store = tmp_path / "s"
    ref = _arrays(train_and_track(cfg, train, test, tmp_path / "ref", progress=False))
    with pytest.raises(_Stop):
        train_and_track(cfg, train, test, store, progress=False, callback=_stop_at(9))
    ck = torch.load(store / "checkpoint.ckpt", weights_only=True)
    ck.pop("checkpoint_format")
    ck["numpy_rng"] = np.random.get_state()
    ck["python_rng"] = __import__("random").getstate()
    torch.save(ck, store / "checkpoint.ckpt")
    model, step = load_store(store).load_model()
    assert step == 8
    got = _arrays(train_and_track(cfg, train, test, store, progress=False))
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_store_arrays_with_code_running_codecs_are_refused(data, tmp_path):
    train, test = data
    store = tmp_path / "s"
    train_and_track(_config(steps=3), train, test, store, progress=False)
    meta_path = store / "logits" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"].append({"name": "pickle"})
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UnsafeFileError, match=r"array 'logits' uses the codec\(s\) \['pickle'\]"):
        load_store(store)


# ============================================================================================
# one writer per store
# ============================================================================================
def test_a_second_writer_gets_a_clear_error(data, tmp_path):
    train, test = data
    cfg = _config()
    store = tmp_path / "s"
    seen = {}

    def second_writer(step, model, optimizer):
        if step == 5:
            with pytest.raises(DirectoryLockedError) as err:
                train_and_track(cfg, train, test, store, progress=False)
            seen["msg"] = str(err.value)

    finished = train_and_track(cfg, train, test, store, progress=False, callback=second_writer)
    assert f"pid {os.getpid()}" in seen["msg"] and "being written by another process" in seen["msg"]
    ref = _arrays(train_and_track(cfg, train, test, tmp_path / "ref", progress=False))
    got = _arrays(finished)  # every step once
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert not (store / "lesde.lock").exists()


def test_a_lock_held_by_another_process_and_a_stale_lock(data, tmp_path, capsys):
    store = tmp_path / "s"
    store.mkdir()
    code = ("import sys, time; from lesde.storage import DirectoryLock; "
            "l = DirectoryLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["phase", "--alpha", "0.5,1", "--beta", "0.2", "--K", "2", "--n", "4", "--times", "5",
                   "--saves", "3", "--replicates", "2", "--no-progress", "-o", str(store)])
        err = capsys.readouterr().err
        assert rc == 2 and f"pid {holder.pid}" in err and "being written by another process" in err
    finally:
        holder.kill()  # killed without releasing: its lock file stays, its flock goes
        holder.wait()
    record = json.loads((store / "lesde.lock").read_text())
    assert record["pid"] == holder.pid
    with pytest.warns(RuntimeWarning, match=rf"taking over the lock left by pid {holder.pid}"):
        assert main(["phase", "--alpha", "0.5,1", "--beta", "0.2", "--K", "2", "--n", "4", "--times", "5",
                     "--saves", "3", "--replicates", "2", "--no-progress", "-o", str(store)]) == 0
    assert not (store / "lesde.lock").exists()


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(data, tmp_path):
    train, test = data
    store = tmp_path / "s"
    store.mkdir()
    (store / "lesde.lock").write_text(json.dumps({"pid": 4242, "host": "node-17", "since": time.time()}))
    with pytest.raises(DirectoryLockedError, match=r"another host.*node-17.*delete .*lesde\.lock"):
        train_and_track(_config(), train, test, store, progress=False)


# ============================================================================================
# partial and damaged stores
# ============================================================================================
def test_partially_created_store_is_recognised_and_recreated(data, tmp_path):
    import zarr

    train, test = data
    cfg = _config(steps=3)
    ref = _arrays(train_and_track(cfg, train, test, tmp_path / "ref", progress=False))
    # killed between creating the arrays and writing the attributes (this version) ...
    g = zarr.open_group(str(tmp_path / "a"), mode="w", attributes={"lesde_creating": True})
    g.create_array("features", shape=(0, 5, 8), chunks=(4, 5, 8), dtype="float64")
    # ... or by an earlier version: arrays and no attributes, or no data fingerprint yet
    g = zarr.open_group(str(tmp_path / "b"), mode="w")
    g.create_array("logits", shape=(0, 5, 3), chunks=(4, 5, 3), dtype="float64")
    zarr.open_group(str(tmp_path / "c"), mode="w").attrs.update(
        {"format_version": 1, "config": cfg.to_dict()})
    (tmp_path / "c" / "features").mkdir()
    for name in "abc":
        with pytest.raises(PartialStoreError, match=r"partly created.*Run the same training command "
                                                    r"again.*or delete the directory"):
            load_store(tmp_path / name)
        with pytest.warns(RuntimeWarning, match="only partly created"):
            got = _arrays(train_and_track(cfg, train, test, tmp_path / name, progress=False))
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_missing_chunks_are_detected_on_read(data, tmp_path):
    from lesde.fit import as_trajectory

    train, test = data
    store = tmp_path / "s"
    train_and_track(_config(), train, test, store, progress=False)
    os.unlink(store / "logits" / "c" / "0" / "0" / "0")
    with pytest.raises(StoreDamagedError, match=r"array 'logits' has no data for rows 0-4 "
                                                r"\(optimizer steps 0-12\)"):
        load_store(store)
    with pytest.raises(StoreDamagedError, match="logits"):
        as_trajectory(str(store))  # the fit refuses the store too
    # a metric array, and the arrays written once at creation
    store2 = tmp_path / "s2"
    train_and_track(_config(track_test_per_class=0, eval_test_size=0), train, None, store2,
                    progress=False)
    load_store(store2)  # an all-zero 'split' chunk is written, so nothing is missing
    os.unlink(store2 / "split" / "c" / "0")
    with pytest.raises(StoreDamagedError, match="'split'"):
        load_store(store2)


def test_resume_after_an_append_killed_between_resize_and_write(data, tmp_path):
    import zarr

    train, test = data
    cfg = _config(steps=12, checkpoint_every=4)
    ref = _arrays(train_and_track(cfg, train, test, tmp_path / "ref", progress=False))
    store = tmp_path / "s"
    with pytest.raises(_Stop):
        train_and_track(cfg, train, test, store, progress=False, callback=_stop_at(10))
    g = zarr.open_group(str(store), mode="r+")
    n = g["step"].shape[0]
    for name in ("features", "step"):  # resized, never written: zeros past the end
        a = g[name]
        a.resize((n + 3,) + tuple(a.shape[1:]))
    got = _arrays(train_and_track(cfg, train, test, store, progress=False))
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_finished_run_returns_without_writing_and_stale_temporaries_go(data, tmp_path):
    train, test = data
    cfg = _config()
    store = tmp_path / "s"
    with pytest.raises(_Stop):
        train_and_track(cfg, train, test, store, progress=False, callback=_stop_at(6))
    stale = store / ".checkpoint.lesde-tmp-99999-abcd.ckpt"
    stale.write_bytes(b"half a checkpoint")
    (store / "step" / "zarr.0123456789abcdef0123456789abcdef.partial").write_text("{")
    train_and_track(cfg, train, test, store, progress=False)
    assert not stale.exists()
    assert not list(store.rglob("*.partial"))

    def snapshot():
        return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in store.rglob("*")}

    before = snapshot()
    time.sleep(0.01)
    again = train_and_track(cfg, train, test, store, progress=False)
    assert again.complete and snapshot() == before  # nothing written, not even a lock file


# ============================================================================================
# training stops on NaN
# ============================================================================================
def test_training_stops_on_a_non_finite_loss_keeping_the_last_checkpoint(data, tmp_path):
    train, test = data
    cfg = _config(lr=1e12, steps=40, log_every=1, checkpoint_every=1, momentum=0.9)
    store = tmp_path / "s"
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step (\d+): .*not finite|"
                                                    r"training diverged at step (\d+): the loss"):
        train_and_track(cfg, train, test, store, progress=False)
    st = load_store(store)
    assert not st.complete
    ck = torch.load(store / "checkpoint.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert np.isfinite(st.array("logits")).all()  # no NaN row was logged
    with pytest.raises(TrainingDivergedError):  # deterministic: diverges again on resume
        train_and_track(cfg, train, test, store, progress=False)


def test_a_nan_training_image_is_refused_before_any_work(data, tmp_path):
    (x, y), test = data
    x = x.clone()
    x[7, 3] = float("nan")
    with pytest.raises(ValueError, match=r"train: 1 image\(s\) contain NaN or inf values \(first at row 7\)"):
        train_and_track(_config(), (x, y), test, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


# ============================================================================================
# memory
# ============================================================================================
def test_memory_is_checked_before_allocating(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LESDE_MEMORY_LIMIT", "2M")
    y = np.repeat(np.arange(3), 1000)
    sde = LESDE(y, Impacts.intra_inter(1.0, 0.2, 3), "cross_entropy", noise="sgd", lr=1.0)
    x0 = initial_state(4, 3000, 3, seed=0)
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* MiB of memory, but only 2\.0 MiB "
                                                      r"is available.*record='summary'"):
        simulate(sde, x0, np.linspace(0, 1, 11), 0.5, seed=0)
    spec = PhaseSpec(grid={"alpha": [0.5, 1.0]}, K=3, n=200, times=(5.0,), saves=11, replicates=4)
    with pytest.raises(InsufficientMemoryError, match=r"one sweep chunk .*--chunk-size"):
        run_sweep(spec, str(tmp_path / "sw"))
    assert not (tmp_path / "sw").exists()  # refused before anything was written
    train, test = data
    with pytest.raises(InsufficientMemoryError, match=r"training 'mlp' .*--batch-size"):
        train_and_track(_config(net_kwargs={"in_dim": D, "hidden": [512, 512]}), train, test,
                        tmp_path / "st", progress=False)
    assert not (tmp_path / "st").exists()
    rc = main(["simulate", "--n", "20000", "--no-progress", "-o", str(tmp_path / "x.npz")])
    assert rc == 2 and "needs about" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()
    monkeypatch.setenv("LESDE_MEMORY_LIMIT", "8G")  # small jobs pass
    simulate(sde, x0, np.linspace(0, 1, 3), 0.5, seed=0)


# ============================================================================================
# overflow: never scored "not separable"
# ============================================================================================
def test_huge_finite_features_are_scored_exactly():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    X = rng.standard_normal((60, 3)) + 3 * np.eye(3)[y]
    big = X * 2.0 ** 700  # about 5e210: |x|^2 and x.mu overflow float64
    assert metrics.ncc_accuracy(big, y) == metrics.ncc_accuracy(X, y)
    assert metrics.argmax_accuracy(big, y) == metrics.argmax_accuracy(X, y)
    assert metrics.nc1(big, y) == pytest.approx(metrics.nc1(X, y), rel=1e-12)
    nc_big, nc = metrics.neural_collapse(big, y, W=np.eye(3)), metrics.neural_collapse(X, y, W=np.eye(3))
    for k, v in nc.as_dict().items():
        assert nc_big.as_dict()[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    lp, lp_big = metrics.linear_separability(X, y), metrics.linear_separability(big, y)
    assert lp_big.separable == lp.separable
    assert lp_big.margin == pytest.approx(lp.margin * 2.0 ** 700, rel=1e-9)


@pytest.mark.parametrize("case", ["decaying_identity", "alpha_400"])
def test_sweep_overflow_is_counted_never_scored_not_separable(case):
    # the two cases of the report at a small size: identity drift with alpha = 1.5, beta = 0,
    # r_alpha 0.1-0.5 to T = 10000 (dt = 1); alpha = 400 at T = 60 (features reach 1e200+)
    if case == "decaying_identity":
        spec = PhaseSpec(grid={"r_alpha": [0.1, 0.3, 0.5]}, drift="identity", noise="additive",
                         sigma=0.1, alpha=1.5, beta=0.0, K=3, n=6, times=(10000.0,), dt=1.0,
                         saves=11, replicates=2, seed=1)
    else:
        spec = PhaseSpec(grid={"alpha": [0.1, 400.0]}, drift="identity", noise="additive", sigma=0.1,
                         beta=0.0, K=3, n=6, times=(60.0,), dt=0.5, saves=13, replicates=2, seed=1)
    from lesde.phase import _run_chunk

    runs = _run_chunk(spec.to_dict(), 0)
    scored = runs[runs["overflow"] == 0]
    # a scored run has finite measures, and "separable" agrees with them
    assert np.isfinite(scored["ncc_accuracy"]).all()
    assert ((scored["sep"] == 1.0) == (scored["ncc_accuracy"] == 1.0)).all()
    # no run is "not separable" with unmeasurable features (the report: p_sep 0, p_overflow 0,
    # nc1 NaN)
    assert not ((runs["overflow"] == 0) & (runs["sep"] == 0) & runs["nc1"].isna()).any()
    table = run_sweep(spec)
    grown = table.iloc[:-1] if case == "decaying_identity" else table.iloc[1:]
    assert (grown["p_overflow"] == 1.0).all() and grown["p_sep"].isna().all()
    mild = table.iloc[-1] if case == "decaying_identity" else table.iloc[0]
    assert mild["p_overflow"] == 0.0 and np.isfinite(mild["p_sep"])


def test_within_cov_and_overflow_time_agree_at_alpha_400():
    y = np.repeat(np.arange(3), 6)
    sde = LESDE(y, Impacts.intra_inter(np.array([400.0, 400.0]), 0.0, 3), "identity", sigma=0.1)
    with pytest.warns(Warning):
        sol = simulate(sde, initial_state(2, 18, 3, seed=0), np.linspace(0, 100, 21), 0.5, seed=0)
    for b in range(2):
        t = sol.overflow_time[b]
        assert t <= 60.0  # overflowed before the scored time of the report
        assert np.isfinite(sol.within_cov[sol.ts < t, b]).all()
        assert np.isnan(sol.within_cov[sol.ts >= t, b]).all()


# ============================================================================================
# sweep folders are tied to their spec
# ============================================================================================
def _spec(**kw):
    base = dict(grid={"alpha": [0.3, 1.0]}, K=2, n=4, times=(5.0,), saves=3, dt=0.5, replicates=2,
                chunk_size=2, seed=3)
    base.update(kw)
    return PhaseSpec(**base)


def test_foreign_chunks_and_missing_config_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_sweep(_spec(), str(a))
    run_sweep(_spec(times=(4.0,)), str(b), max_chunks=1)
    # a chunk of another sweep dropped into chunks/
    other = b / "chunks" / "chunk_000000.parquet"
    target = a / "chunks" / "chunk_000001.parquet"
    target.write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match=r"chunk_000001\.parquet belongs to another sweep"):
        load_sweep(str(a))
    (a / "runs.parquet").unlink()
    with pytest.raises(ValueError, match="belongs to another sweep"):
        run_sweep(_spec(), str(a))
    # a chunk renamed to another index of the same sweep
    target.write_bytes((a / "chunks" / "chunk_000000.parquet").read_bytes())
    with pytest.raises(ValueError, match=r"does not hold chunk 1 of this sweep"):
        run_sweep(_spec(), str(a))
    # config.json deleted, rerun with another spec: the old chunks are not reused
    (b / "config.json").unlink()
    with pytest.raises(ValueError, match=r"1 chunk file\(s\) of a sweep but no config\.json.*delete"):
        run_sweep(_spec(times=(6.0,)), str(b))
    # a truncated config.json and a truncated chunk
    c = tmp_path / "c"
    run_sweep(_spec(), str(c), max_chunks=1)
    cfg = (c / "config.json").read_text()
    (c / "config.json").write_text(cfg[: len(cfg) // 2])
    with pytest.raises(ValueError, match=r"config\.json is truncated or not valid JSON"):
        run_sweep(_spec(), str(c))
    (c / "config.json").write_text(cfg)
    chunk = c / "chunks" / "chunk_000000.parquet"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"chunk_000000\.parquet is unreadable.*delete it and rerun"):
        run_sweep(_spec(), str(c))


def test_finished_sweep_returns_without_writing_and_temporaries_are_removed(tmp_path):
    d = tmp_path / "sw"
    spec = _spec()
    run_sweep(spec, str(d), max_chunks=1)
    stale = [d / "chunks" / ".chunk_000001.lesde-tmp-99999-abcd.parquet", d / "table.csv.tmp",
             d / "chunks" / "chunk_000001.parquet.tmp12345"]
    for f in stale:
        f.write_text("partial")
    whole = run_sweep(spec, str(d))
    assert not any(f.exists() for f in stale)
    files = {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in d.rglob("*")}
    again = run_sweep(spec, str(d))
    assert {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in d.rglob("*")} == files
    assert again.equals(whole)
    with DirectoryLock(d, "sweep directory"):
        (d / "runs.parquet").unlink()
        with pytest.raises(DirectoryLockedError, match="sweep directory"):
            run_sweep(spec, str(d))


# ============================================================================================
# atomic writes
# ============================================================================================
def test_an_interrupted_write_leaves_the_previous_file(tmp_path):
    y = np.repeat(np.arange(2), 3)
    sde = LESDE(y, Impacts.intra_inter(1.0, 0.2, 2), "cross_entropy", noise="sgd", lr=1.0)
    sol = simulate(sde, initial_state(1, 6, 2, seed=0), [0.0, 1.0], 0.5, seed=0)
    path = tmp_path / "sol.npz"
    sol.save(path)
    before = path.read_bytes()

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_write(path, "wb") as f:
            f.write(b"half")
            raise Boom
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["sol.npz"]
    # a write killed between its temporary file and the rename: the next write removes it
    from lesde.storage import _host_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = tmp_path / f".sol.lesde-tmp-{_host_tag()}-{dead}-0badc0de.npz"
    left.write_bytes(b"half")
    sol.save(path)
    assert not left.exists() and Solution.load(path).ts.tolist() == [0.0, 1.0]
    assert sol.save(tmp_path / "noext") == str(tmp_path / "noext.npz")  # numpy's naming kept
    Solution.load(tmp_path / "noext.npz")
