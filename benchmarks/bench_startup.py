"""Start-up times: ``lesde --help``, ``import lesde``, the imports a simulation needs.

Each command runs in a fresh interpreter ``--repeats`` times; wall-clock and CPU (user + system)
seconds are reported as minimum and median. CPU time is the steadier number on a shared machine
(wall time waits for the other jobs); the load average is printed beside the results.

    python benchmarks/bench_startup.py --repeats 7
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _lesde_script() -> list:
    script = os.path.join(os.path.dirname(sys.executable), "lesde")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "import sys; from lesde.cli import main; sys.exit(main())"]


def commands() -> dict:
    py = sys.executable
    return {
        "lesde --help": _lesde_script() + ["--help"],
        "import lesde": [py, "-c", "import lesde"],
        "import lesde; lesde.simulate (model + solvers)": [py, "-c", "import lesde; lesde.simulate"],
        "import lesde; every public name": [py, "-c", "import lesde; [getattr(lesde, n) for n in lesde.__all__]"],
        "import torch (reference)": [py, "-c", "import torch"],
    }


def measure(cmd: list, repeats: int) -> dict:
    walls, cpus = [], []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return {"wall_min": min(walls), "wall_median": statistics.median(walls),
            "cpu_min": min(cpus), "cpu_median": statistics.median(cpus)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs per command (default %(default)s)")
    args = ap.parse_args(argv)
    subprocess.run(commands()["import lesde"], check=True)  # warm the file cache
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    print(f"{'command':50s} {'wall min':>9s} {'wall med':>9s} {'cpu min':>8s} {'cpu med':>8s}")
    for name, cmd in commands().items():
        r = measure(cmd, args.repeats)
        print(f"{name:50s} {r['wall_min']:8.2f}s {r['wall_median']:8.2f}s {r['cpu_min']:7.2f}s "
              f"{r['cpu_median']:7.2f}s")
    load = os.getloadavg()
    print(f"load average after:  {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
