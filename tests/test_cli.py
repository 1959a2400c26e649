"""The command line: simulate writes a loadable solution; bad input is one clear error line."""
import numpy as np

from lesde import Solution
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


def test_demo_writes_figure(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--T", "40", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
