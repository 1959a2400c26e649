"""Bad input, walked as a table: every case is a clear error of the right type whose message
names the argument or the file; through the command line it is one line on stderr and exit
status 2, never a traceback."""
import io
import json
import math
import os
import zipfile
from contextlib import redirect_stderr

import numpy as np
import pytest
import torch

import lesde
from lesde import metrics
from lesde.cli import main
from lesde.phase import PhaseSpec, load_sweep, run_sweep
from lesde.resources import InsufficientMemoryError
from lesde.solvers import Solution, initial_state, simulate
from lesde.storage import UnsafeFileError
from lesde.tracking import TrainConfig, load_store, train_and_track

CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# fixtures: small valid objects and files to break
# --------------------------------------------------------------------------------------------
def _sde(labels=None):
    y = np.repeat(np.arange(3), 4) if labels is None else labels
    return lesde.LESDE(y, lesde.Impacts.intra_inter(1.0, 0.2, 3), "cross_entropy", noise="sgd", lr=1.0)


def _blobs(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n)
    return torch.randn(3 * n, 4, generator=g) + 2 * torch.eye(4)[y], y


def _cfg(**kw):
    base = dict(net="mlp", num_classes=3, net_kwargs={"in_dim": 4, "hidden": [4]}, lr=0.1,
                batch_size=2, steps=4, log_every=2, track_per_class=2, checkpoint_every=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A directory of damaged files, each built from a valid one."""
    d = tmp_path_factory.mktemp("bad_files")
    sol = simulate(_sde(), initial_state(1, 12, 3, seed=0), [0.0, 1.0], 0.5, seed=0)
    good = d / "good.npz"
    sol.save(good)
    raw = good.read_bytes()
    arrays = dict(np.load(good))
    flipped = bytearray(raw)
    for i in range(len(raw) // 3, len(raw) // 3 + 64):  # inside the first member's data
        flipped[i] ^= 0xFF
    (d / "flipped.npz").write_bytes(bytes(flipped))
    (d / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    np.savez(d / "no_ts.npz", **{k: v for k, v in arrays.items() if k != "ts"})
    np.savez(d / "bad_params.npz", **{**arrays, "params_json": np.array("{not json")})
    np.savez(d / "bad_version.npz", **{**arrays, "format_version": np.array("one")})
    np.savez(d / "object_ts.npz", **{**arrays, "ts": np.array([{"x": 1}, None], dtype=object)})
    np.savez(d / "bad_shapes.npz", **{**arrays, "within_cov": arrays["within_cov"][:1]})
    (d / "text.npz").write_text("not an archive")
    # a trajectory store and a damaged copy of its checkpoint
    store = d / "store"
    train_and_track(_cfg(), _blobs(), None, store, progress=False)
    ckpt = (store / "checkpoint.ckpt").read_bytes()
    (store / "checkpoint.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    (d / "a_file").write_text("x")
    # a sweep with a truncated config.json
    sweep = d / "sweep"
    spec = PhaseSpec(grid={"alpha": [0.5, 1.0]}, K=2, n=3, times=(2.0,), saves=3, replicates=1)
    run_sweep(spec, str(sweep))
    cfg = (sweep / "config.json").read_text()
    (sweep / "config.json").write_text(cfg[: len(cfg) // 3])
    (d / "config_truncated.json").write_text('{"net": "mlp", "num_cl')
    return d


# --------------------------------------------------------------------------------------------
# the API
# --------------------------------------------------------------------------------------------
API_CASES = [
    # (id, callable(files) -> None, error type, regex the message must match)
    ("string labels", lambda f: _sde(np.array(["a", "b", "c"])), ValueError, r"labels must be integer"),
    ("runs -1", lambda f: simulate(_sde(), np.zeros((12, 3)), [0, 1], 0.5, num_runs=-1, seed=0),
     ValueError, r"num_runs must be a positive integer"),
    ("runs 0", lambda f: simulate(_sde(), np.zeros((12, 3)), [0, 1], 0.5, num_runs=0, seed=0),
     ValueError, r"num_runs"),
    ("dt 0", lambda f: simulate(_sde(), np.zeros((12, 3)), [0, 1], 0.0, seed=0), ValueError, r"dt must be positive"),
    ("T 0", lambda f: simulate(_sde(), np.zeros((12, 3)), [0, 0], 0.5, seed=0), ValueError, r"ts must be strictly increasing"),
    ("device nonsense", lambda f: simulate(_sde(), np.zeros((12, 3)), [0, 1], 0.5, seed=0, device="gpu7"),
     ValueError, r"device 'gpu7' is not a torch device"),
    ("solution flipped bytes", lambda f: Solution.load(f / "flipped.npz"), ValueError,
     r"flipped\.npz: array '\w+' is corrupt or truncated"),
    ("solution truncated", lambda f: Solution.load(f / "truncated.npz"), ValueError, r"truncated\.npz"),
    ("solution without ts", lambda f: Solution.load(f / "no_ts.npz"), ValueError, r"no_ts\.npz .*no array 'ts'"),
    ("solution broken params_json", lambda f: Solution.load(f / "bad_params.npz"), ValueError,
     r"bad_params\.npz: params_json is not valid JSON"),
    ("solution broken format_version", lambda f: Solution.load(f / "bad_version.npz"), ValueError,
     r"bad_version\.npz: format_version must be an integer"),
    ("solution object array", lambda f: Solution.load(f / "object_ts.npz"), ValueError,
     r"object_ts\.npz: array 'ts' holds Python objects"),
    ("solution shapes", lambda f: Solution.load(f / "bad_shapes.npz"), ValueError,
     r"bad_shapes\.npz: array 'within_cov' has shape"),
    ("solution not an archive", lambda f: Solution.load(f / "text.npz"), ValueError, r"text\.npz"),
    ("solution missing", lambda f: Solution.load(f / "missing.npz"), FileNotFoundError, r"missing\.npz"),
    ("geomnist p_err abc", lambda f: lesde.make_geomnist(2, p_err="abc"), ValueError, r"p_err"),
    ("geomnist p_err 2", lambda f: lesde.make_geomnist(2, p_err=2.0), ValueError, r"p_err"),
    ("geomnist n 0", lambda f: lesde.make_geomnist(0), ValueError, r"n_per_class"),
    ("config num_classes '3'", lambda f: _cfg(num_classes="3"), ValueError, r"num_classes must be an integer"),
    ("config lr inf", lambda f: _cfg(lr=math.inf), ValueError, r"lr must be finite"),
    ("config lr nan", lambda f: _cfg(lr=math.nan), ValueError, r"lr must be finite"),
    ("config epochs -1", lambda f: _cfg(steps=0, epochs=-1.0), ValueError, r"steps and epochs must be >= 0"),
    ("config steps -4", lambda f: _cfg(steps=-4, epochs=1.0), ValueError, r"steps and epochs must be >= 0"),
    ("config epochs 0", lambda f: _cfg(steps=0, epochs=0.0), ValueError, r"exactly one of steps and epochs"),
    ("config net", lambda f: _cfg(net="vgg"), ValueError, r"net: unknown network 'vgg'"),
    ("config batch 0", lambda f: _cfg(batch_size=0), ValueError, r"batch_size must be at least 1"),
    ("config JSON", lambda f: TrainConfig.from_json('{"net": '), ValueError, r"not a valid TrainConfig JSON"),
    ("config JSON missing field", lambda f: TrainConfig.from_json('{"net": "mlp"}'), ValueError,
     r"TrainConfig fields missing: num_classes"),
    ("train batch > set", lambda f: train_and_track(_cfg(batch_size=1000), _blobs(), None, f / "s1", progress=False),
     ValueError, r"batch_size 1000 is larger than the training set \(30 samples\)"),
    ("train net kwargs", lambda f: train_and_track(_cfg(net_kwargs={"in_dim": 4, "foo": 1}), _blobs(), None,
                                                   f / "s2", progress=False),
     ValueError, r"net_kwargs .* do not fit network 'mlp'.*foo"),
    ("train net does not fit the images", lambda f: train_and_track(_cfg(net_kwargs={"in_dim": 5}), _blobs(), None,
                                                                    f / "s3", progress=False),
     ValueError, r"cannot take training images of shape \(4,\)"),
    ("train string labels", lambda f: train_and_track(_cfg(), (_blobs()[0], np.array(["a"] * 30)), None,
                                                      f / "s4", progress=False),
     ValueError, r"train: labels must be integer class indices"),
    ("train labels out of range", lambda f: train_and_track(_cfg(), (_blobs()[0], _blobs()[1] + 1), None,
                                                            f / "s5", progress=False),
     ValueError, r"train: labels must lie in 0..2"),
    ("train store is a file", lambda f: train_and_track(_cfg(), _blobs(), None, f / "a_file", progress=False),
     ValueError, r"a_file .*is a directory|a_file exists and is not a directory|a_file"),
    ("train device", lambda f: train_and_track(_cfg(device="tpu"), _blobs(), None, f / "s6", progress=False),
     ValueError, r"device 'tpu'"),
    ("resnet width -1", lambda f: lesde.build_net("resnet18", 3, width=-1), ValueError, r"width must be a positive"),
    ("mlp hidden -1", lambda f: lesde.MLP(4, hidden=[-1]), ValueError, r"hidden width must be a positive integer"),
    ("net num_classes 0", lambda f: lesde.LeNet(num_classes=0), ValueError, r"num_classes must be a positive"),
    ("truncated checkpoint", lambda f: load_store(f / "store").load_model(), ValueError,
     r"checkpoint .*checkpoint\.ckpt is truncated or corrupt"),
    ("store missing", lambda f: load_store(f / "nothing"), FileNotFoundError, r"nothing"),
    ("store is a file", lambda f: load_store(f / "a_file"), ValueError, r"a_file is not a lesde trajectory store"),
    ("sweep truncated config", lambda f: load_sweep(str(f / "sweep")), ValueError,
     r"sweep.config\.json is truncated or not valid JSON"),
    ("phase grid abc", lambda f: PhaseSpec(grid={"alpha": ["abc"]}), ValueError, r"grid parameter 'alpha' must hold numbers"),
    ("phase grid empty", lambda f: PhaseSpec(grid={"alpha": []}), ValueError, r"grid parameter 'alpha' has no values"),
    ("phase chunk_size 0", lambda f: PhaseSpec(grid={"alpha": [1.0]}, chunk_size=0), ValueError, r"chunk_size"),
    ("phase times 0", lambda f: PhaseSpec(grid={"alpha": [1.0]}, times=(0.0,)), ValueError, r"times must be positive"),
    ("phase dt abc", lambda f: PhaseSpec(grid={"alpha": [1.0]}, dt="abc"), ValueError, r"dt must be a number"),
    ("phase K '3'", lambda f: PhaseSpec(grid={"alpha": [1.0]}, K="3"), ValueError, r"K must be an integer"),
    ("phase huge grid", lambda f: PhaseSpec(grid={"alpha": np.zeros(10**5), "beta": np.zeros(10**5)}),
     InsufficientMemoryError, r"planning this sweep \(10000000000 grid points"),
    ("sweep max_chunks -1", lambda f: run_sweep(PhaseSpec(grid={"alpha": [1.0]}), max_chunks=-1), ValueError, r"max_chunks"),
    ("sweep threads -1", lambda f: run_sweep(PhaseSpec(grid={"alpha": [1.0]}), threads=-1), ValueError, r"threads"),
    ("metrics string labels", lambda f: metrics.ncc_accuracy(np.zeros((3, 2)), np.array(["a", "b", "c"])),
     ValueError, r"y must hold integer class labels"),
    ("memory limit env", lambda f: _with_env("LESDE_MEMORY_LIMIT", "lots", lambda: simulate(
        _sde(), np.zeros((12, 3)), [0, 1], 0.5, seed=0)), ValueError, r"LESDE_MEMORY_LIMIT"),
]
if not CUDA:
    API_CASES.append(("device cuda", lambda f: simulate(_sde(), np.zeros((12, 3)), [0, 1], 0.5, seed=0,
                                                          device="cuda"),
                      ValueError, r"CUDA is not available"))


def _with_env(name, value, fn):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case, files):
    _, fn, exc, pattern = case
    with pytest.raises(exc, match=pattern) as err:
        fn(files)
    assert "\n" not in str(err.value).strip()  # one line


# --------------------------------------------------------------------------------------------
# the command line (in-process; exit status 2, one line on stderr naming the option or file)
# --------------------------------------------------------------------------------------------
_GEO = ["--data", "geomnist", "--per-class", "4", "--test-per-class", "2", "--net", "mlp",
        "--net-kwargs", '{"hidden": [4]}', "--steps", "2", "--track", "2", "--track-test", "1",
        "--no-progress"]

CLI_CASES = [
    ("simulate --runs -1", ["simulate", "--runs", "-1"], r"--runs must be a positive integer, got -1"),
    ("simulate --runs 0", ["simulate", "--runs", "0"], r"--runs must be a positive integer"),
    ("simulate --threads -1", ["simulate", "--threads", "-1"], r"--threads must be a positive integer"),
    ("simulate --T 0", ["simulate", "--T", "0"], r"--T must be positive"),
    ("simulate --dt -1", ["simulate", "--dt", "-1"], r"--dt must be positive"),
    ("simulate --saves 1", ["simulate", "--saves", "1"], r"--saves must be at least 2"),
    ("simulate --K 0", ["simulate", "--K", "0"], r"--K must be a positive integer"),
    ("simulate --sigma -1", ["simulate", "--noise", "additive", "--sigma", "-1"], r"--sigma must be non-negative"),
    ("simulate --alpha nan", ["simulate", "--alpha", "nan"], r"--alpha must be a finite number"),
    ("simulate --alpha abc", ["simulate", "--alpha", "abc"], r"argument --alpha: expected a number"),
    ("simulate --n 200000000", ["simulate", "--n", "200000000"], r"needs about .* GiB of memory.*record='summary'"),
    ("simulate --device bogus", ["simulate", "--device", "bogus"], r"--device 'bogus' is not a torch device"),
    ("simulate -o into a file", ["simulate", "-o", "{files}/a_file/x.npz"], r"-o/--output .*a_file is not a directory"),
    ("simulate -o a directory", ["simulate", "-o", "{files}"], r"-o/--output .* is a directory"),
    ("phase --alpha 0.1:1:0", ["phase", "--alpha", "0.1:1:0", "-o", "{tmp}/sw"], r"argument --alpha: COUNT must be a positive integer"),
    ("phase --alpha 1:0.1:-3", ["phase", "--alpha", "1:0.1:-3", "-o", "{tmp}/sw"], r"argument --alpha: COUNT must be a positive integer, got '-3'"),
    ("phase --alpha 1:x:3", ["phase", "--alpha", "1:x:3", "-o", "{tmp}/sw"], r"argument --alpha: a range is START:STOP:COUNT of numbers"),
    ("phase --alpha abc", ["phase", "--alpha", "abc", "-o", "{tmp}/sw"], r"--alpha takes numbers, got 'abc'"),
    ("phase --times abc", ["phase", "--times", "abc", "-o", "{tmp}/sw"], r"--times takes numbers"),
    ("phase --times 0", ["phase", "--times", "0", "-o", "{tmp}/sw"], r"--times must be positive"),
    ("phase --workers -1", ["phase", "--workers", "-1", "-o", "{tmp}/sw"], r"--workers must be a positive integer"),
    ("phase --workers 0", ["phase", "--workers", "0", "-o", "{tmp}/sw"], r"--workers must be a positive integer"),
    ("phase --chunk-size 0", ["phase", "--chunk-size", "0", "-o", "{tmp}/sw"], r"--chunk-size must be a positive integer"),
    ("phase --K 1.5", ["phase", "--K", "1.5", "-o", "{tmp}/sw"], r"K must be a positive integer, got 1.5"),
    ("phase --noise loud", ["phase", "--noise", "loud", "-o", "{tmp}/sw"], r"noise must be additive, sgd or both"),
    ("phase grid too large", ["phase", "--alpha", "0:1:100000", "--beta", "0:1:100000", "-o", "{tmp}/sw"],
     r"planning this sweep .* grid points"),
    ("phase chunk too large", ["phase", "--n", "200000", "--saves", "400", "-o", "{tmp}/sw"],
     r"one sweep chunk .*--chunk-size"),
    ("phase -o a file", ["phase", "-o", "{files}/a_file"], r"sweep directory .*a_file exists and is not a directory"),
    ("phase other spec", ["phase", "--alpha", "0.5,2", "-o", "{files}/sweep"], r"config\.json is truncated"),
    ("train --classes airplane 11", ["train", "{tmp}/st", "--data-path", "{files}", "--classes", "airplane", "11"],
     r"--classes: index 11 outside 0..9"),
    ("train --classes dragon", ["train", "{tmp}/st", "--data-path", "{files}", "--classes", "dragon"],
     r"--classes: unknown CIFAR-10 class 'dragon'"),
    ("train --data-path missing", ["train", "{tmp}/st", "--data-path", "{tmp}/nowhere"], r"--data-path: .*does not exist"),
    ("train --net-kwargs foo", ["train", "{tmp}/st"] + _GEO[:-3] + ["--net-kwargs", '{"foo": 1}'],
     r"net_kwargs .* do not fit network 'mlp'.*'foo'"),
    ("train --net-kwargs bad JSON", ["train", "{tmp}/st", "--data", "geomnist", "--net-kwargs", "{bad"],
     r"--net-kwargs must be a JSON object"),
    ("train --epochs 0", ["train", "{tmp}/st", "--data", "geomnist", "--epochs", "0"], r"--epochs must be positive"),
    ("train --epochs -1", ["train", "{tmp}/st", "--data", "geomnist", "--epochs", "-1"], r"--epochs must be positive"),
    ("train --steps 0", ["train", "{tmp}/st", "--data", "geomnist", "--steps", "0"], r"--steps must be a positive integer"),
    ("train --width -1", ["train", "{tmp}/st", "--data", "geomnist", "--width", "-1"], r"--width must be positive"),
    ("train --width 0 in net-kwargs", ["train", "{tmp}/st", "--data", "geomnist", "--net", "resnet20",
                                       "--net-kwargs", '{"width": 0}'], r"width must be a positive number"),
    ("train --lr inf", ["train", "{tmp}/st", "--data", "geomnist", "--lr", "inf"], r"--lr must be positive"),
    ("train --p-err 2", ["train", "{tmp}/st", "--data", "geomnist", "--p-err", "2"], r"--p-err must be a number in \[0, 1\]"),
    ("train --batch-size > set", ["train", "{tmp}/st"] + _GEO + ["--batch-size", "1000"],
     r"batch_size 1000 is larger than the training set \(12 samples\)"),
    ("train --device bogus", ["train", "{tmp}/st", "--data", "geomnist", "--device", "bogus"], r"--device 'bogus'"),
    ("train --config missing", ["train", "{tmp}/st", "--data", "geomnist", "--config", "{tmp}/none.json"], r"none\.json"),
    ("train --config truncated", ["train", "{tmp}/st", "--data", "geomnist", "--config", "{files}/config_truncated.json"],
     r"--config .*config_truncated\.json: not a valid TrainConfig JSON"),
    ("train store is a file", ["train", "{files}/a_file", "--data", "geomnist"], r"a_file exists and is not a lesde trajectory store"),
    ("train store of another run", ["train", "{files}/store", "--data", "geomnist"],
     r"store .*store holds a run with a different config \(net: 'mlp' in the store vs 'resnet18' now"),
    ("figures phase no sweep", ["figures", "phase", "{tmp}"], r"no sweep at .*config\.json missing"),
    ("figures phase --csv dir", ["figures", "phase", "{files}/sweep", "--csv", "{files}"], r"--csv .* is a directory"),
    ("figures nc --cases", ["figures", "nc", "--cases", "1;2", "--out", "{tmp}/nc.png"], r"--cases: each case is ALPHA,BETA"),
    ("figures nc --runs 0", ["figures", "nc", "--runs", "0", "--out", "{tmp}/nc.png"], r"--runs must be a positive integer"),
    ("demo --out a dir", ["demo", "--out", "{files}"], r"--out .* is a directory"),
]
if not CUDA:
    CLI_CASES += [
        ("simulate --device cuda", ["simulate", "--device", "cuda"], r"--device 'cuda': CUDA is not available"),
        ("train --device cuda", ["train", "{tmp}/st", "--data", "geomnist", "--device", "cuda"],
         r"--device 'cuda': CUDA is not available"),
    ]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, files, tmp_path):
    _, argv, pattern = case
    argv = [a.replace("{files}", str(files)).replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "simulate" and "-o" not in argv:
        argv += ["-o", str(tmp_path / "out.npz")]
    if argv[0] in ("simulate", "phase"):
        argv.append("--no-progress")
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exit_:  # argparse rejects the option itself
            rc = exit_.code
    text = err.getvalue()
    assert rc == 2, text
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"lesde {argv[0]}: error:") or "error: argument" in last, last
    assert __import__("re").search(pattern, last), last
    assert not (tmp_path / "out.npz").exists()  # nothing written
    assert not (tmp_path / "sw").exists() and not (tmp_path / "st").exists()
