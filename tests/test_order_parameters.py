"""The order parameter (training loss of the model's own read-out) beside the LP notion."""
import numpy as np
import pytest

from lesde import LESDE, CrossEntropyReadout, Impacts, initial_state, metrics, simulate


def _ce_run():
    K, n = 3, 20
    y = np.repeat(np.arange(K), n)
    sde = LESDE(y, Impacts.intra_inter(np.array([1.0, 1.0, 0.5]), np.array([0.2, 1.0, 1.0]), K),
                "cross_entropy", noise="sgd", lr=1.0)
    x0 = initial_state(3, K * n, K, std=0.5, seed=1)
    return simulate(sde, x0, np.linspace(0, 200, 5), 0.5, seed=0)


def test_order_parameter_table_and_the_two_notions():
    sol = _ce_run()
    tab = metrics.order_parameters(sol)
    assert list(tab.columns) == ["t", "run", "train_loss", "accuracy", "ncc_accuracy", "lp_separable", "lp_margin"]
    assert len(tab) == 5 * 3
    final = tab[tab.t == 200.0].set_index("run")
    # locally elastic: loss -> 0, all correct; neutral: chance; reversed: loss grows, accuracy 0,
    # yet LP-separable (by a reversed classifier): the weaker notion.
    assert final.train_loss[0] < 0.05 and final.accuracy[0] == 1.0 and final.lp_separable[0] == 1.0
    assert final.train_loss[1] > 0.8 and final.accuracy[1] < 0.6
    assert final.train_loss[2] > 5.0 and final.accuracy[2] == 0.0 and final.lp_separable[2] == 1.0
    # the columns are the metrics themselves
    np.testing.assert_allclose(tab.train_loss.values, np.asarray(metrics.cross_entropy(sol.states, sol.labels)).ravel())
    np.testing.assert_allclose(tab.ncc_accuracy.values, np.asarray(metrics.ncc_accuracy(sol.states, sol.labels)).ravel())


def test_order_parameters_readout_from_solution_params():
    y = np.repeat(np.arange(2), 10)
    W = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]])
    sde = LESDE(y, Impacts.intra_inter(1.0, 0.2, 2), CrossEntropyReadout(W), noise="sgd", lr=0.5)
    sol = simulate(sde, initial_state(2, 20, 3, seed=0), [0.0, 10.0], 0.5, seed=1)
    tab = metrics.order_parameters(sol, lp_every=2)
    expect = np.asarray(metrics.cross_entropy(sol.states, y, W=W)).ravel()
    np.testing.assert_allclose(tab.train_loss.values, expect)
    assert np.isnan(tab.lp_separable.values[2:]).all()  # only every 2nd time


def test_order_parameters_bad_input():
    sol = _ce_run()
    with pytest.raises(ValueError, match="not logits"):
        metrics.order_parameters((sol.ts, sol.states[..., :2], sol.labels))
    sol.states = None
    with pytest.raises(ValueError, match="record='full'"):
        metrics.order_parameters(sol)
