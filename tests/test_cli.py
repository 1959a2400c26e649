"""The command line: simulate writes a loadable solution; bad input is one clear error line."""
import numpy as np
import pytest

from lesde import Solution, load_store
from lesde.cli import main


def test_simulate_writes_solution(tmp_path, capsys):
    out = tmp_path / "s.npz"
    rc = main(["simulate", "--K", "3", "--n", "10", "--alpha", "1,0.5", "--beta", "0.2,1", "--T", "20",
               "--dt", "0.5", "--saves", "5", "--no-progress", "-o", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "final training cross-entropy" in text and str(out) in text
    sol = Solution.load(out)
    assert sol.states.shape == (5, 2, 30, 3) and sol.params["noise"] == "sgd"


def test_simulate_bad_input_is_one_line(capsys):
    rc = main(["simulate", "--K", "3", "--n", "5", "--sigma", "-1", "--noise", "additive", "--no-progress",
               "-o", "unused.npz"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "sigma must be non-negative" in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_writes_figure(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--T", "40", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.cifar
def test_train_on_real_cifar10_end_to_end(tmp_path, cifar10_path, capsys):
    # real data, a real (small) network, a resumable store, then the fit command on it
    store = tmp_path / "store"
    args = ["train", str(store), "--data", "cifar10", "--data-path", cifar10_path, "--classes", "airplane",
            "automobile", "bird", "--per-class", "40", "--test-per-class", "20", "--net", "mlp",
            "--net-kwargs", '{"hidden": [64]}', "--lr", "0.05", "--momentum", "0", "--batch-size", "8",
            "--steps", "30", "--log-every", "5", "--track", "6", "--track-test", "4", "--checkpoint-every", "10",
            "--no-progress"]
    assert main(args) == 0
    st = load_store(str(store))
    assert len(st) == 7 and st.array("logits").shape == (7, 30, 3)
    assert "train_acc" in capsys.readouterr().out
    assert main(args) == 0  # rerunning a finished run changes nothing
    assert len(load_store(str(store))) == 7
    out = tmp_path / "fit"
    assert main(["fit", str(store), "--out", str(out), "--estimators", "regression", "--n-bootstrap", "0"]) == 0
    assert (out / "summary.json").exists()


def test_fit_two_runs_as_trials(tmp_path, capsys):
    """`lesde fit RUN1 RUN2`: two runs (other seeds) fitted as two trials; a run logged at other
    times is one clear error line."""
    import json

    import torch

    from lesde.tracking import TrainConfig, train_and_track

    g = torch.Generator().manual_seed(0)
    K, n = 3, 30
    y = torch.arange(K).repeat(n)
    x = torch.randn(K * n, 4, generator=g) + 2 * torch.nn.functional.one_hot(y, 4).float()
    cfg = dict(net="mlp", num_classes=K, net_kwargs={"in_dim": 4, "hidden": [8]}, lr=0.05,
               batch_size=1, steps=120, log_every=10, track_per_class=10)
    for seed, steps in ((0, 120), (1, 120), (2, 60)):
        train_and_track(TrainConfig(**cfg, seed=seed) if steps == 120 else
                        TrainConfig(**{**cfg, "steps": steps}, seed=seed),
                        (x, y), store=str(tmp_path / f"run{seed}"), progress=False)
    out = tmp_path / "fit"
    rc = main(["fit", str(tmp_path / "run0"), str(tmp_path / "run1"), "--out", str(out),
               "--estimators", "regression", "--reg-window", "4", "--n-bootstrap", "5"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["store"] == "run0+run1"
    rc = main(["fit", str(tmp_path / "run0"), str(tmp_path / "run2"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "other times" in err and "Traceback" not in err
