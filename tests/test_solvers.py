"""Solvers: native Euler-Maruyama vs torchsde path by path, reproducibility, recording,
overflow, saving, bad input."""
import numpy as np
import pytest
import torch
import torchsde

from lesde import model as m
from lesde.solvers import LESDEOverflowWarning, Solution, initial_state, simulate
from problems import balanced_labels, random_x0, unbalanced_labels


def _sde(noise="additive", field="cross_entropy", labels=None, time_varying=False):
    y = unbalanced_labels() if labels is None else labels
    if time_varying:
        imp = m.Impacts.intra_inter(m.PowerLaw(np.array([1.0, 2.0]), 0.7, t0=0.5),
                                    lambda t: np.array([0.5, 0.1]) * np.cos(t), 3)
        sigma = lambda t: 0.3 + 0.1 * t
    else:
        imp = m.Impacts.intra_inter(np.array([1.0, 2.0]), np.array([0.5, 0.1]), 3)
        sigma = np.array([0.3, 0.2])
    return m.LESDE(y, imp, field, sigma=sigma, noise=noise, lr=0.1)


@pytest.mark.parametrize("noise", ["additive", "sgd", "both"])
@pytest.mark.parametrize("time_varying", [False, True])
@pytest.mark.parametrize("field", ["cross_entropy", "identity"])
def test_native_equals_torchsde_euler_path_by_path(noise, time_varying, field):
    sde = _sde(noise, field, time_varying=time_varying)
    x0 = random_x0(2, sde.N, 3, seed=1)
    ts = np.array([0.0, 0.25, 0.5, 1.0])
    dt = 1 / 32  # exact in binary: both step on the same grid
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(2, sde.brownian_size), dtype=torch.float64, entropy=7)
    native = simulate(sde, x0, ts, dt, brownian=bm)
    ref = simulate(sde, x0, ts, dt, backend="torchsde", method="euler", brownian=bm)
    np.testing.assert_allclose(native.states, ref.states, rtol=0, atol=1e-12)
    assert np.abs(native.states[-1] - native.states[0]).max() > 0.01  # it moved


def test_uneven_save_times_land_exactly():
    sde = _sde()
    x0 = random_x0(2, sde.N, 3, seed=1)
    ts = np.array([0.0, 0.1, 0.37, 0.5])
    bm = torchsde.BrownianInterval(0.0, 0.5, size=(2, sde.brownian_size), dtype=torch.float64, entropy=3)
    a = simulate(sde, x0, ts, 0.05, brownian=bm)
    b = simulate(sde, x0, ts, 0.05, backend="torchsde", brownian=bm)
    np.testing.assert_allclose(a.states, b.states, atol=1e-12)


def test_same_seed_same_result_and_generator():
    sde = _sde("both")
    x0 = random_x0(2, sde.N, 3, seed=1)
    ts = np.linspace(0, 1, 5)
    a = simulate(sde, x0, ts, 0.01, seed=11)
    b = simulate(sde, x0, ts, 0.01, seed=11)
    c = simulate(sde, x0, ts, 0.01, seed=12)
    np.testing.assert_array_equal(a.states, b.states)
    assert np.abs(a.states[-1] - c.states[-1]).max() > 1e-3
    g = torch.Generator().manual_seed(11)
    d = simulate(sde, x0, ts, 0.01, generator=g)
    np.testing.assert_array_equal(a.states, d.states)
    e1 = simulate(sde, x0, ts, 0.01, backend="torchsde", seed=5)
    e2 = simulate(sde, x0, ts, 0.01, backend="torchsde", seed=5)
    np.testing.assert_array_equal(e1.states, e2.states)
    assert a.params["seed"] == 11


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["native", "torchsde"])
def test_dtypes(dtype, backend):
    sde = _sde()
    x0 = random_x0(2, sde.N, 3, seed=1, dtype=dtype)
    sol = simulate(sde, x0, [0.0, 0.5], 0.05, seed=0, backend=backend)
    assert sol.params["dtype"] == str(dtype).replace("torch.", "")
    assert np.isfinite(sol.states).all()


def test_summaries_match_states():
    sde = _sde()
    x0 = random_x0(2, sde.N, 3, seed=1)
    sol = simulate(sde, x0, [0.0, 0.3, 0.6], 0.05, seed=0)
    y = sde.labels.numpy()
    for k in range(3):
        xs = sol.states[:, :, y == k]
        mu = xs.mean(2)
        np.testing.assert_allclose(sol.class_means[:, :, k], mu, atol=1e-12)
        c = xs - mu[:, :, None]
        np.testing.assert_allclose(sol.within_cov[:, :, k], np.einsum("tbna,tbnc->tbac", c, c) / xs.shape[2], atol=1e-12)
    summ = simulate(sde, x0, [0.0, 0.3, 0.6], 0.05, seed=0, record="summary")
    assert summ.states is None
    np.testing.assert_array_equal(summ.class_means, sol.class_means)


def test_x0_replicated_over_runs_and_params():
    sde = _sde()
    sol = simulate(sde, random_x0(1, sde.N, 3)[0], [0, 0.1], 0.05, seed=0)
    assert sol.num_runs == 2  # parameter batch
    sde1 = m.LESDE(unbalanced_labels(), m.Impacts.intra_inter(1.0, 0.5, 3), "cross_entropy", sigma=0.1)
    sol = simulate(sde1, random_x0(1, sde1.N, 3)[0], [0, 0.1], 0.05, seed=0, num_runs=5)
    assert sol.states.shape == (2, 5, sde1.N, 3)
    assert np.abs(sol.states[1, 0] - sol.states[1, 1]).max() > 0  # independent noise


def test_torchsde_other_methods_solve_the_ode():
    # sigma = 0: every method must follow the exact I-model solution exp((A + (K-1) B)/K) ...
    K, n = 2, 3
    y = balanced_labels(K, n)
    sde = m.LESDE(y, m.Impacts.intra_inter(1.0, 0.4, K), "identity", sigma=0.0, dim=1)
    x0 = np.ones((K * n, 1))
    exact = np.exp((1.0 + 0.4) / K * 1.0)
    for method, tol in [("euler", 2e-3), ("milstein", 2e-3), ("srk", 1e-6)]:
        sol = simulate(sde, x0, [0.0, 1.0], 1e-3, backend="torchsde", method=method, seed=0)
        assert abs(sol.states[-1, 0, 0, 0] - exact) < tol * exact, method


def test_overflow_detected_and_reported():
    y = balanced_labels(2, 3)
    sde = m.LESDE(y, m.Impacts.intra_inter(np.array([1.0, 400.0]), 0.0, 2), "identity", sigma=0.1, dim=2)
    x0 = initial_state(2, 6, 2, seed=0)
    # Euler growth per step is (1 + 200 dt) = 3 on the grand mean: the state leaves float64
    # after about log(1.8e308)/log(3) = 646 steps (t = 6.5), its second moments once the
    # features pass sqrt(1.8e308) = 1.3e154, after about 323 steps (t = 3.2). Overflow is
    # recorded at the first save time at which the state or any recorded second moment is not
    # finite (within-class deviations may round to exactly 0, keeping within_cov finite
    # longer), so it lies in (3, 7], and every record before it is finite, every record from
    # it on NaN: within_cov and overflow_time agree.
    for backend in ("native", "torchsde"):
        with pytest.warns(LESDEOverflowWarning, match="overflowed"):
            sol = simulate(sde, x0, np.linspace(0, 10, 11), 0.01, seed=1, backend=backend)
        assert np.isnan(sol.overflow_time[0]) and np.isfinite(sol.states[:, 0]).all()
        assert sol.overflowed.tolist() == [False, True]
        t_over = sol.overflow_time[1]
        assert 3.0 < t_over <= 7.0, backend
        before, after = sol.ts < t_over, sol.ts >= t_over
        for rec in (sol.states, sol.class_means, sol.within_cov):
            assert np.isfinite(rec[before, 1]).all() and np.isnan(rec[after, 1]).all(), backend


def test_save_load_roundtrip(tmp_path):
    sde = _sde("both")
    sol = simulate(sde, random_x0(2, sde.N, 3), [0.0, 0.2], 0.05, seed=3)
    sol.save(tmp_path / "s.npz")
    back = Solution.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.states, sol.states)
    np.testing.assert_array_equal(back.within_cov, sol.within_cov)
    assert back.params["noise"] == "both" and back.params["seed"] == 3
    # a file of another format version is refused with both versions named
    data = dict(np.load(tmp_path / "s.npz"))
    data["format_version"] = np.array(99)
    np.savez(tmp_path / "old.npz", **data)
    with pytest.raises(ValueError, match="version 99"):
        Solution.load(tmp_path / "old.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a lesde solution"):
        Solution.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        Solution.load(tmp_path / "junk.npz")


@pytest.mark.parametrize("kwargs, match", [
    (dict(ts=[0.0, 0.0, 1.0]), "strictly increasing"),
    (dict(ts=[0.0]), "at least two"),
    (dict(ts=[0.0, np.nan]), "finite"),
    (dict(dt=0.0), "dt must be positive"),
    (dict(dt=-1.0), "dt must be positive"),
    (dict(x0=np.zeros((3, 11, 3))), "parameter batch"),
    (dict(x0=np.zeros((11, 2))), r"\(B, N, p\)"),
    (dict(x0=np.full((11, 3), np.nan)), "non-finite"),
    (dict(record="all"), "record"),
    (dict(backend="jax"), "backend"),
    (dict(seed=1, generator=torch.Generator()), "either seed or generator"),
    (dict(seed=-3), "non-negative"),
])
def test_bad_simulate_input(kwargs, match):
    sde = _sde()
    args = dict(x0=np.zeros((11, 3)), ts=[0.0, 1.0], dt=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        simulate(sde, **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_given_same_increments():
    sde = _sde("both")
    x0 = random_x0(2, sde.N, 3, seed=1)
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(2, sde.brownian_size), dtype=torch.float64, entropy=7)
    cpu = simulate(sde, x0, [0.0, 0.5, 1.0], 1 / 32, brownian=bm)
    bm_cuda = lambda a, b: bm(a, b).cuda()
    gpu = simulate(sde, x0.cuda(), [0.0, 0.5, 1.0], 1 / 32, brownian=bm_cuda)
    np.testing.assert_allclose(gpu.states, cpu.states, atol=1e-10)
    assert gpu.params["device"].startswith("cuda")
    sol = simulate(sde, x0.cuda().float(), [0.0, 1.0], 0.01, seed=0)
    assert np.isfinite(sol.states).all()
