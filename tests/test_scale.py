"""Memory at scale: record="summary" keeps the peak memory of a run independent of the number
of save times (what a run at N = 10^6 relies on; benchmarks/README.md, "Scale")."""
import os

import numpy as np
import pytest

from lesde import LESDE, Impacts, initial_state, simulate


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024          # kB -> bytes
    raise KeyError(field)


def _peak_growth(run):
    """Peak resident memory of ``run()`` above the resident memory before it (Linux: the
    high-water mark is reset through /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    run()
    return _status("VmHWM") - before


def _can_measure():
    try:
        _peak_growth(lambda: None)
        return True
    except OSError:
        return False


@pytest.mark.skipif(not (os.path.exists("/proc/self/clear_refs") and _can_measure()),
                    reason="needs Linux /proc/self/clear_refs to reset the peak-memory mark")
@pytest.mark.parametrize("method", ["euler", "exact"])
def test_summary_memory_is_independent_of_the_number_of_saves(method):
    K, n, p = 4, 5000, 4
    N = K * n
    y = np.repeat(np.arange(K), n)
    field = "identity" if method == "exact" else "cross_entropy"
    sde = LESDE(y, Impacts.intra_inter(1.0, 0.2, K), field, sigma=0.1, dim=p)
    x0 = initial_state(1, N, p, std=0.5, seed=0)

    def run(T):
        return lambda: simulate(sde, x0, np.linspace(0.0, 0.01 * (T - 1), T), 0.01, seed=1,
                                record="summary", method=method)

    run(5)()                                                        # one-time allocations
    small, large = _peak_growth(run(5)), _peak_growth(run(500))
    full_states = 500 * N * p * 8                                   # what record="full" would hold
    # 500 saves need 500 x (K p + K p^2) summary numbers (0.3 MB) beside the O(N p) working set
    assert large - small < 16 * 2 ** 20, (small, large)
    assert large < full_states / 10, (large, full_states)
