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
