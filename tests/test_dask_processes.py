"""A sweep on a Dask scheduler and worker started by hand, as separate processes (the way a
cluster is joined with `lesde phase --dask-scheduler ADDRESS`), gives the in-process table."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from lesde.cli import main

pytest.importorskip("distributed")


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # dask's clean shutdown
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def _wait_for(predicate, timeout, what, procs):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args[3]} exited ({proc.returncode}) before {what}")
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_sweep_on_a_scheduler_and_worker_started_by_hand(tmp_path, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    scheduler_file = tmp_path / "scheduler.json"
    logs = [open(tmp_path / name, "w") for name in ("scheduler.log", "worker.log")]
    procs = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", str(scheduler_file)],
            stdout=logs[0], stderr=subprocess.STDOUT, env=env, cwd=tmp_path))

        def address():
            try:
                return json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                return None

        addr = _wait_for(address, 120, "the scheduler's address", procs)
        # the worker runs elsewhere: its own working directory, nothing shared but the address
        (tmp_path / "worker").mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", addr, "--nworkers", "1", "--nthreads", "1",
             "--no-dashboard", "--local-directory", str(tmp_path / "worker")],
            stdout=logs[1], stderr=subprocess.STDOUT, env=env, cwd=tmp_path / "worker"))
        from distributed import Client

        with Client(addr, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        sweep = ["phase", "--alpha", "0.3,1", "--beta", "0.3,1", "--times", "10,20", "--saves", "5",
                 "--n", "6", "--replicates", "3", "--chunk-size", "4", "--seed", "5", "--no-progress"]
        assert main(sweep + ["--dask-scheduler", addr, "-o", str(tmp_path / "dask")]) == 0
        assert f"on Dask scheduler {addr}" in capsys.readouterr().out
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for log in logs:
            log.close()
    assert main(sweep + ["--threads", "1", "-o", str(tmp_path / "local")]) == 0
    remote = pd.read_csv(tmp_path / "dask" / "table.csv")
    local = pd.read_csv(tmp_path / "local" / "table.csv")
    pd.testing.assert_frame_equal(remote, local)
    assert len(list((tmp_path / "dask" / "chunks").glob("*.parquet"))) == 3  # 12 runs / 4
    assert not list((tmp_path / "worker").rglob("*.parquet"))  # chunks came back to the client
