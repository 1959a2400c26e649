"""`lesde fit` writes its figures: fit.png and goodness_of_fit.png on a tiny real run."""
import json
import pytest
import torch

from lesde.cli import main
from lesde.data import GEOMNIST_CLASSES, make_geomnist
from lesde.tracking import TrainConfig, train_and_track


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    torch.set_num_threads(1)
    g = make_geomnist(8, seed=0)
    data = (torch.from_numpy(g.images), torch.from_numpy(g.labels))
    cfg = TrainConfig(net="lenet", num_classes=3, net_kwargs={"in_channels": 1}, lr=0.05,
                      batch_size=4, steps=24, log_every=2, track_per_class=6,
                      eval_train_size=0, impacts_every=12, impacts_per_class=3, seed=0,
                      class_names=GEOMNIST_CLASSES)
    path = tmp_path_factory.mktemp("store") / "geomnist_tiny"
    train_and_track(cfg, data, None, str(path), progress=False)
    return str(path)


def test_fit_writes_figures_and_summary(tiny_store, tmp_path):
    out = tmp_path / "fit"
    rc = main(["fit", tiny_store, "--out", str(out), "--estimators", "regression",
               "--n-bootstrap", "8", "--gof-paths", "4", "--reg-window", "3", "--threads", "1", "--compare", "0"])
    assert rc == 0
    for name in ("fit.png", "goodness_of_fit.png", "summary.json", "measured_impacts.csv",
                 "regression.csv"):
        assert (out / name).is_file(), name
    assert (out / "fit.png").stat().st_size > 10_000
    with open(out / "summary.json") as fh:
        s = json.load(fh)
    for key in ("store", "what", "split", "T", "N", "p", "K", "field", "n_bootstrap",
                "estimators", "measured_impacts", "goodness_of_fit", "figures"):
        assert key in s, key
    assert s["T"] == 13 and s["K"] == 3 and s["N"] == 18
    assert "regression" in s["estimators"]
    assert "fit.png" in s["figures"] and "goodness_of_fit.png" in s["figures"]
    reg = s["goodness_of_fit"]["regression"]
    assert {"r2", "coverage", "spread_rel_error", "accuracy_mae"} <= set(reg)
    for f in s["figures"]:
        assert (out / f).is_file()


def test_fit_without_gof_writes_only_fit_png(tiny_store, tmp_path):
    out = tmp_path / "fit0"
    assert main(["fit", tiny_store, "--out", str(out), "--estimators", "i,l,regression",
                 "--n-bootstrap", "4", "--reg-window", "3", "--compare", "0"]) == 0
    assert (out / "fit.png").is_file()
    assert not (out / "goodness_of_fit.png").exists()
    with open(out / "summary.json") as fh:
        s = json.load(fh)
    assert set(s["estimators"]) == {"i", "l", "regression"}
    assert s["figures"] == ["fit.png"] and "goodness_of_fit" not in s
