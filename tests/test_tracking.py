"""Tests of the training logger: store layout and contents, format versions, resume, impacts."""
import json

import numpy as np
import pytest
import torch

from lesde.tracking import (FORMAT_VERSION, TrainConfig, TrajectoryStore, load_store,
                            train_and_track)

K = 3
D = 8


def _blobs(n_per_class, seed):
    """Three Gaussian blobs in R^8, shaped (N, 1, 2, 4) like tiny images; float32, long."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, D, generator=g, dtype=torch.float64) * 1.5
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), D, generator=g, dtype=torch.float64)
    return x.float().reshape(-1, 1, 2, 4), y


@pytest.fixture(scope="module")
def data():
    return _blobs(20, 0), _blobs(10, 1)


def _config(**kw):
    base = dict(net="mlp", num_classes=K, net_kwargs={"in_dim": D, "hidden": [16]},
                optimizer="sgd", lr=0.05, momentum=0.9, batch_size=4, steps=20, log_every=5,
                track_per_class=4, track_test_per_class=2, eval_train_size=30,
                eval_test_size=-1, seed=3, dtype="float64", checkpoint_every=7,
                class_names=("a", "b", "c"))
    base.update(kw)
    return TrainConfig(**base)


def _arrays(store):
    names = ["features", "logits", "labels", "split", "index", "step", "time", "train_loss",
             "train_acc", "test_loss", "test_acc"]
    if store.config.impacts_every:
        names += ["impacts", "impact_step", "impact_time", "impact_alpha", "impact_beta"]
    return {n: store.array(n) for n in names}


def test_config_json_round_trip_and_validation():
    cfg = _config(net_kwargs={"in_dim": D, "hidden": [16, 8]}, epochs=0.5, steps=0)
    again = TrainConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["class_names"] == ["a", "b", "c"]
    assert cfg.total_steps(60) == 8  # ceil(0.5 * (60 // 4))
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        _config(epochs=1.0)
    with pytest.raises(ValueError, match="optimizer"):
        _config(optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown TrainConfig fields: bogus"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_store_shapes_contents_and_checkpoint_recomputation(data, tmp_path):
    train, test = data
    cfg = _config()
    store = train_and_track(cfg, train, test, tmp_path / "run", progress=False)
    m_train, m_test = K * 4, K * 2
    m = m_train + m_test
    assert len(store) == 5 and store.complete
    assert store["features"].shape == (5, m, 16)
    assert store["logits"].shape == (5, m, K)
    np.testing.assert_array_equal(store.step, [0, 5, 10, 15, 20])
    np.testing.assert_allclose(store.time, store.step * cfg.lr)  # lr-scaled time
    split, index, labels = store.split, store.index, store.labels
    np.testing.assert_array_equal(split, [0] * m_train + [1] * m_test)
    np.testing.assert_array_equal(labels[:m_train], train[1].numpy()[index[:m_train]])
    np.testing.assert_array_equal(labels[m_train:], test[1].numpy()[index[m_train:]])
    np.testing.assert_array_equal(np.bincount(labels[:m_train]), [4, 4, 4])
    assert store.config == cfg and store.class_names == ["a", "b", "c"]
    assert store.group.attrs["format_version"] == FORMAT_VERSION
    assert store.group.attrs["n_eval_train"] == 30 and store.group.attrs["n_eval_test"] == 30
    met = store.metrics()
    assert np.all((met["train_acc"] >= 0) & (met["train_acc"] <= 1))
    assert met["train_loss"][-1] < met["train_loss"][0]
    # the last row was logged at the last step, which is also the final checkpoint
    model, step = store.load_model()
    assert step == 20
    xs = torch.cat([train[0][torch.as_tensor(index[:m_train])],
                    test[0][torch.as_tensor(index[m_train:])]]).double()
    with torch.no_grad():
        f, z = model.forward_features(xs)
    np.testing.assert_allclose(store["logits"][-1], z.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(store["features"][-1], f.numpy(), rtol=1e-12, atol=1e-12)
    # test metrics: the whole test set (eval_test_size=-1)
    with torch.no_grad():
        acc = float((model(test[0].double()).argmax(1) == test[1]).double().mean())
    assert met["test_acc"][-1] == pytest.approx(acc)
    # class means: (T, K, d), equal to the plain mean over the tracked train samples of a class
    cm = store.class_means("logits")
    assert cm.shape == (5, K, K)
    np.testing.assert_allclose(cm[:, 1], store.array("logits")[:, :m_train][:, labels[:m_train] == 1]
                               .mean(axis=1))
    assert store.class_means("features", split="test").shape == (5, K, 16)


def test_format_version_mismatch_and_not_a_store(data, tmp_path):
    import zarr

    train, test = data
    train_and_track(_config(steps=5), train, test, tmp_path / "run", progress=False)
    g = zarr.open_group(str(tmp_path / "run"), mode="r+")
    g.attrs["format_version"] = FORMAT_VERSION + 98
    with pytest.raises(ValueError, match=rf"format_version {FORMAT_VERSION + 98}.*"
                                         rf"reads format_version {FORMAT_VERSION}"):
        load_store(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a lesde trajectory store"):
        TrajectoryStore.open(tmp_path / "empty")
    zarr.open_group(str(tmp_path / "other"), mode="w").attrs["x"] = 1
    with pytest.raises(ValueError, match="not a lesde trajectory store"):
        load_store(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_store(tmp_path / "missing")


class _Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(data, tmp_path):
    train, test = data
    cfg = _config(steps=30, log_every=3, checkpoint_every=7)
    ref = _arrays(train_and_track(cfg, train, test, tmp_path / "ref", progress=False))

    def stop_after_17(step, model, optimizer):
        if step == 17:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_and_track(cfg, train, test, tmp_path / "a", progress=False, callback=stop_after_17)
    partial = load_store(tmp_path / "a")
    assert not partial.complete
    np.testing.assert_array_equal(partial.step, [0, 3, 6, 9, 12, 15])  # all logged rows kept
    resumed = train_and_track(cfg, train, test, tmp_path / "a", progress=False)
    assert resumed.complete
    got = _arrays(resumed)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)

    # stopping with until_step, twice, then finishing; a finished run is left as it is
    train_and_track(cfg, train, test, tmp_path / "b", progress=False, until_step=8)
    train_and_track(cfg, train, test, tmp_path / "b", progress=False, until_step=22)
    train_and_track(cfg, train, test, tmp_path / "b", progress=False)
    again = _arrays(train_and_track(cfg, train, test, tmp_path / "b", progress=False))
    for name in ref:
        np.testing.assert_array_equal(again[name], ref[name], err_msg=name)

    other = (train[0] + 0.01, train[1])
    with pytest.raises(ValueError, match="other training/test data"):
        train_and_track(cfg, other, test, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="different config.*lr"):
        train_and_track(_config(steps=30, log_every=3, lr=0.01), train, test, tmp_path / "b",
                        progress=False)


def test_batch_size_one_adam_float32(data, tmp_path):
    train, _ = data
    cfg = _config(batch_size=1, optimizer="adam", lr=1e-3, steps=12, log_every=4,
                  track_test_per_class=0, dtype="float32", checkpoint_every=0)
    (tmp_path / "run").mkdir()  # an existing empty directory becomes a new store
    store = train_and_track(cfg, train, None, tmp_path / "run", progress=False)
    np.testing.assert_array_equal(store.step, [0, 4, 8, 12])
    assert store["features"].dtype == np.float32 and store["features"].shape == (4, 12, 16)
    assert np.all(np.isnan(store.metrics()["test_acc"]))


def test_impacts_recorded_when_enabled(data, tmp_path):
    pytest.importorskip("lesde.elasticity")
    train, test = data
    cfg = _config(steps=10, impacts_every=5, impacts_per_class=3)
    store = train_and_track(cfg, train, test, tmp_path / "run", progress=False)
    imp = store.impacts()
    np.testing.assert_array_equal(imp["step"], [0, 5, 10])
    np.testing.assert_allclose(imp["time"], imp["step"] * cfg.lr)
    assert imp["E"].shape == (3, K, K) and np.all(np.isfinite(imp["E"]))
    np.testing.assert_allclose(imp["alpha"], np.diagonal(imp["E"], axis1=1, axis2=2).mean(1))
    plain = train_and_track(_config(steps=2), train, test, tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match="no impacts"):
        plain.impacts()
