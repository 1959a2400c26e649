"""Tests of lesde.data: CIFAR-10 in every layout (tiny files written here), GeoMNIST, label noise.

The real CIFAR-10 is used only through the ``cifar10_path`` fixture (``LESDE_CIFAR10``).
"""
import io
import os
import pickle
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from lesde.data import (
    CIFAR10_CLASSES,
    GEOMNIST_CLASSES,
    DataFormatError,
    UnsafePickleError,
    GEOMNIST_VARIANTS,
    apply_label_noise,
    geomnist_train_val,
    load_cifar10,
    make_geomnist,
)
from lesde.data import _zhang2021_mask, _zhang2021_params

# --------------------------------------------------------------------------------------------
# Tiny CIFAR-10 files in the real formats
# --------------------------------------------------------------------------------------------


def _py2_pickle(obj) -> bytes:
    """Protocol-2 pickle as python 2 wrote the published batches (py2 ``str`` = BINSTRING).

    Supports what a CIFAR-10 batch holds: dicts, lists, byte strings, ints and a uint8 numpy
    array (pickled through ``numpy.core.multiarray._reconstruct``, as in the real files).
    """
    out = bytearray(b"\x80\x02")

    def string(b):
        if len(b) < 256:
            out.extend(b"U" + bytes([len(b)]) + b)
        else:
            out.extend(b"T" + struct.pack("<i", len(b)) + b)

    def integer(v):
        if 0 <= v < 256:
            out.extend(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            out.extend(b"M" + struct.pack("<H", v))
        else:
            out.extend(b"J" + struct.pack("<i", v))

    def dump(o):
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                dump(k)
                dump(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                dump(v)
            out.extend(b"e")
        elif isinstance(o, bytes):
            string(o)
        elif isinstance(o, int):
            integer(o)
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8 and o.ndim == 2
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85")
            string(b"b")
            out.extend(b"\x87R(K\x01")
            integer(o.shape[0])
            integer(o.shape[1])
            out.extend(b"\x86cnumpy\ndtype\n")
            string(b"u1")
            out.extend(b"K\x00K\x01\x87R(K\x03")
            string(b"|")
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            string(np.ascontiguousarray(o).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    dump(obj)
    out.extend(b".")
    return bytes(out)


def _dump(obj, path, style):
    """Write ``obj`` as python 2 did ("py2") or with python 3's pickle ("py3-2", "py3-5")."""
    with open(path, "wb") as f:
        if style == "py2":
            f.write(_py2_pickle(obj))
        else:
            pickle.dump(obj, f, protocol=int(style[-1]))


def _fake_cifar(n_train_per_batch=12, n_test=15, seed=0):
    """Random uint8 images (N, 32, 32, 3) and labels for train (5 batches) and test."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", 5 * n_train_per_batch), ("test", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        out[split] = (rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), labels)
    return out


def _to_rows(images):
    """(N, 32, 32, 3) -> the batch format's (N, 3072) rows: 1024 R, 1024 G, 1024 B."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _write_batches(directory, data, style="py2"):
    os.makedirs(directory, exist_ok=True)
    meta = {b"num_cases_per_batch": 12, b"label_names": [c.encode() for c in CIFAR10_CLASSES],
            b"num_vis": 3072}
    _dump(meta, os.path.join(directory, "batches.meta"), style)
    images, labels = data["train"]
    for b, (im, lab) in enumerate(zip(np.array_split(images, 5), np.array_split(labels, 5))):
        batch = {b"batch_label": f"training batch {b + 1} of 5".encode(), b"labels": lab.tolist(),
                 b"data": _to_rows(im), b"filenames": [b"x_%d.png" % i for i in range(len(im))]}
        _dump(batch, os.path.join(directory, f"data_batch_{b + 1}"), style)
    images, labels = data["test"]
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": labels.tolist(),
             b"data": _to_rows(images), b"filenames": [b"t.png"] * len(images)}
    _dump(batch, os.path.join(directory, "test_batch"), style)
    return directory


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _folder_members(data):
    """{relative path: png bytes} of the image-folder layout; file order within a class is the
    data order (names 0000.png, 0001.png, ...)."""
    members = {}
    for split, (images, labels) in data.items():
        for c, name in enumerate(CIFAR10_CLASSES):
            for j, i in enumerate(np.flatnonzero(labels == c)):
                members[f"{split}/{name}/{j:04d}.png"] = _png(images[i])
    return members


def _write_folder(root, data):
    for rel, raw in _folder_members(data).items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(raw)
    return root


def _write_zip(path, data, prefix="cifar10/", shuffle_seed=1):
    items = list(_folder_members(data).items())
    order = np.random.default_rng(shuffle_seed).permutation(len(items))  # zip order != sorted
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in order:
            z.writestr(prefix + items[i][0], items[i][1])
    return path


def _expected(data, split, classes=None):
    """Images grouped by class (in the order asked), data order within a class."""
    images, labels = data[split]
    classes = range(10) if classes is None else classes
    idx = np.concatenate([np.flatnonzero(labels == c) for c in classes])
    return images[idx], labels[idx]


@pytest.fixture(scope="module")
def fake():
    return _fake_cifar()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, fake):
    """The same fake data as python batches (py2 and py3 pickles), a directory and a zip."""
    base = tmp_path_factory.mktemp("cifar")
    return {
        "batches-py2": _write_batches(str(base / "py2" / "cifar-10-batches-py"), fake, "py2"),
        "batches-py3-2": _write_batches(str(base / "py3-2"), fake, "py3-2"),
        "batches-py3-5": _write_batches(str(base / "py3-5"), fake, "py3-5"),
        "folder": _write_folder(str(base / "folder"), fake),
        "zip": _write_zip(str(base / "c.zip"), fake),
    }


LAYOUTS = ["batches-py2", "batches-py3-2", "batches-py3-5", "folder", "zip"]


# --------------------------------------------------------------------------------------------
# Loading back exactly
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_loads_back_exactly(layouts, fake, layout, split):
    images, labels = load_cifar10(layouts[layout], split=split)
    want_images, want_labels = _expected(fake, split)
    assert images.dtype == np.uint8 and images.shape == want_images.shape
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)


def test_py2_pickle_helper_writes_the_real_format():
    """The helper's bytes unpickle with the standard library as the published files do."""
    arr = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    obj = pickle.loads(_py2_pickle({b"data": arr, b"labels": [1, 300]}), encoding="bytes")
    np.testing.assert_array_equal(obj[b"data"], arr)
    assert obj[b"labels"] == [1, 300]


@pytest.mark.parametrize("layout", ["batches-py2", "folder", "zip"])
def test_classes_are_remapped_in_the_given_order(layouts, fake, layout):
    images, labels = load_cifar10(layouts[layout], split="train", classes=["ship", 0, "cat"])
    want_images, _ = _expected(fake, "train", [8, 0, 3])
    np.testing.assert_array_equal(images, want_images)
    counts = [int((fake["train"][1] == c).sum()) for c in (8, 0, 3)]
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], counts))


@pytest.mark.parametrize("layout", ["batches-py3-5", "folder", "zip"])
def test_per_class_subset_is_deterministic_per_seed(layouts, fake, layout):
    path = layouts[layout]
    a = load_cifar10(path, classes=[1, 2], per_class=3, seed=0)
    b = load_cifar10(path, classes=[1, 2], per_class=3, seed=0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], [0, 0, 0, 1, 1, 1])
    # every picked image is one of that class's images
    for img, lab in zip(*a):
        pool = _expected(fake, "train", [[1, 2][lab]])[0]
        assert any(np.array_equal(img, p) for p in pool)
    # different seeds pick different subsets (6 images per class: 20 subsets of 3)
    subsets = {load_cifar10(path, classes=[1], per_class=3, seed=s)[0].tobytes()
               for s in range(6)}
    assert len(subsets) > 1
    # a class's subset does not depend on the other classes asked for
    alone = load_cifar10(path, classes=[2], per_class=3, seed=0)[0]
    np.testing.assert_array_equal(alone, a[0][3:])


def test_zip_and_directory_pick_the_same_subset(layouts):
    a = load_cifar10(layouts["folder"], classes=["bird"], per_class=4, seed=7)[0]
    b = load_cifar10(layouts["zip"], classes=["bird"], per_class=4, seed=7)[0]
    np.testing.assert_array_equal(a, b)


def test_zip_ignores_macos_metadata(tmp_path, fake):
    path = _write_zip(str(tmp_path / "m.zip"), fake)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("__MACOSX/cifar10/test/cat/._0000.png", b"resource fork")
        z.writestr("cifar10/test/cat/._0000.png", b"resource fork")
    images, _ = load_cifar10(path, split="test", classes=["cat"])
    np.testing.assert_array_equal(images, _expected(fake, "test", [3])[0])


def test_as_tensor_normalisation(layouts, fake):
    x, y = load_cifar10(layouts["zip"], split="test", as_tensor=True, dtype=torch.float64)
    images, labels = _expected(fake, "test")
    assert x.shape == (len(images), 3, 32, 32) and x.dtype == torch.float64
    assert y.dtype == torch.long
    want = (torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, want)
    np.testing.assert_array_equal(y.numpy(), labels)
    assert x.min() >= -1 and x.max() <= 1


def test_parent_directory_is_found(layouts, fake, tmp_path):
    parent = os.path.dirname(layouts["batches-py2"])  # holds cifar-10-batches-py/
    np.testing.assert_array_equal(load_cifar10(parent, split="test")[0], _expected(fake, "test")[0])


# --------------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_malicious_pickle_is_refused_and_not_run(layouts, tmp_path, how, protocol):
    directory = tmp_path / "evil"
    shutil.copytree(layouts["batches-py3-2"], directory)
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = _Evil(os.system, f"touch {marker}")
        forbidden = os.system.__module__ + r"\.system"  # posix.system or nt.system
    else:
        payload = _Evil(exec, f"open({str(marker)!r}, 'w').close()")
        forbidden = r"(builtins|__builtin__)\.exec"  # protocol 2 writes python 2's name
    with open(directory / "data_batch_3", "wb") as f:
        pickle.dump({b"data": payload, b"labels": []}, f, protocol=protocol)
    with pytest.raises(UnsafePickleError, match=forbidden) as info:
        load_cifar10(str(directory))
    assert isinstance(info.value, pickle.UnpicklingError) and isinstance(info.value, ValueError)
    assert "data_batch_3" in str(info.value)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Errors that name the problem
# --------------------------------------------------------------------------------------------

def test_truncated_zip(layouts, tmp_path):
    raw = open(layouts["zip"], "rb").read()
    bad = tmp_path / "truncated.zip"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="truncated or corrupt"):
        load_cifar10(str(bad))


def test_corrupt_zip_member(tmp_path, fake):
    path = _write_zip(str(tmp_path / "c.zip"), fake)
    raw = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("cifar10/test/cat/0000.png")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 40] ^= 0xFF  # flip one byte of the stored PNG: the CRC no longer matches
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(DataFormatError, match="test/cat/0000.png"):
        load_cifar10(path, split="test", classes=["cat"])


def test_batch_with_wrong_number_of_bytes(layouts, tmp_path):
    directory = tmp_path / "short"
    shutil.copytree(layouts["batches-py2"], directory)
    batch = {b"labels": [0, 1], b"data": np.zeros((2, 3000), dtype=np.uint8)}
    _dump(batch, directory / "data_batch_2", "py2")
    with pytest.raises(DataFormatError, match=r"data_batch_2.*6000 bytes.*6144"):
        load_cifar10(str(directory))


def test_truncated_batch(layouts, tmp_path):
    directory = tmp_path / "trunc"
    shutil.copytree(layouts["batches-py2"], directory)
    raw = (directory / "test_batch").read_bytes()
    (directory / "test_batch").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataFormatError, match="test_batch.*truncated or corrupt"):
        load_cifar10(str(directory), split="test")


def test_missing_batch_file(layouts, tmp_path):
    directory = tmp_path / "missing"
    shutil.copytree(layouts["batches-py2"], directory)
    os.remove(directory / "data_batch_5")
    with pytest.raises(FileNotFoundError, match="data_batch_5"):
        load_cifar10(str(directory))
    load_cifar10(str(directory), split="test")  # the test split is still complete


def test_image_of_wrong_size_and_unreadable_image(tmp_path, fake):
    root = _write_folder(str(tmp_path / "f"), fake)
    Image.new("RGB", (28, 32)).save(os.path.join(root, "train", "dog", "0001.png"))
    with pytest.raises(DataFormatError, match=r"dog/0001.png.*28x32.*32x32"):
        load_cifar10(root, classes=["dog"])
    with open(os.path.join(root, "train", "frog", "0000.png"), "wb") as f:
        f.write(b"not an image at all")
    with pytest.raises(DataFormatError, match=r"frog/0000.png.*unreadable"):
        load_cifar10(root, classes=["frog"])
    load_cifar10(root, classes=["cat"])  # only the requested images are decoded


def test_argument_and_layout_errors(layouts, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="unknown layout"):
        load_cifar10(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataFormatError, match="unknown layout"):
        load_cifar10(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="unknown CIFAR-10 class 'kitten'"):
        load_cifar10(layouts["zip"], classes=["cat", "kitten"])
    with pytest.raises(ValueError, match=r"per_class=7 but only 6 images of class 'cat'"):
        load_cifar10(layouts["folder"], classes=["cat"], per_class=7)
    with pytest.raises(ValueError, match="per_class=7 but only 6"):
        load_cifar10(layouts["batches-py2"], classes=["cat"], per_class=7)
    with pytest.raises(ValueError, match="split"):
        load_cifar10(layouts["zip"], split="valid")
    with pytest.raises(ValueError, match="repeated"):
        load_cifar10(layouts["zip"], classes=[3, "cat"])


# --------------------------------------------------------------------------------------------
# The real CIFAR-10 (skipped unless LESDE_CIFAR10 is set)
# --------------------------------------------------------------------------------------------

@pytest.mark.cifar
def test_real_cifar10_three_classes(cifar10_path):
    x, y = load_cifar10(cifar10_path, classes=["airplane", "automobile", "ship"], per_class=50,
                        seed=0)
    assert x.shape == (150, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, np.repeat([0, 1, 2], 50))
    assert len({im.tobytes() for im in x}) == 150
    xt, yt = load_cifar10(cifar10_path, split="test", classes=[0, 1, 8], per_class=50,
                          as_tensor=True)
    assert xt.shape == (150, 3, 32, 32) and xt.dtype == torch.float32
    assert -1 <= xt.min() and xt.max() <= 1 and yt.dtype == torch.long


@pytest.mark.cifar
def test_real_cifar10_channel_means(cifar10_path):
    """Channel means of 1,000 train images per class against the full train set's.

    The sample is stratified like the full set (equal class sizes), so its channel mean is an
    average of n = 10,000 per-image means drawn without replacement from N = 50,000; its
    standard error is at most sd(per-image mean) / sqrt(n) * sqrt(1 - n / N). We allow five of
    those (about 0.01), far beyond chance but far below any channel swap or scaling error.
    """
    x, _ = load_cifar10(cifar10_path, per_class=1000, seed=3)
    per_image = x.reshape(len(x), -1, 3).mean(axis=1) / 255.0  # (n, 3)
    n, big_n = len(x), 50_000
    se = per_image.std(axis=0, ddof=1) / np.sqrt(n) * np.sqrt(1 - n / big_n)
    published = np.array([0.4913, 0.4821, 0.4465])
    diff = np.abs(per_image.mean(axis=0) - published)
    assert np.all(diff < 5 * se), (per_image.mean(axis=0), se)


# --------------------------------------------------------------------------------------------
# GeoMNIST
# --------------------------------------------------------------------------------------------

def _area_over_moment_ellipse(img, sigma):
    """Filled area / area of the shape's second-moment ellipse, from the image alone.

    Mass = area (coverage fractions, blur keeps mass). The image's covariance is the shape's
    plus sigma^2 (blur) plus 1/12 (pixel integration) per axis; removing those, a uniform
    shape with covariance C has moment-ellipse area 4 pi sqrt(det C). The ratio is invariant
    under any affine map (rotation, scaling, shear), and equals 1 for an ellipse, 3/pi = 0.955
    for any rectangle and 3 sqrt(3) / (2 pi) = 0.827 for any triangle.
    """
    img = img.astype(np.float64)
    m = img.sum()
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    mx, my = (img * xx).sum() / m, (img * yy).sum() / m
    extra = sigma**2 + 1 / 12
    cxx = (img * (xx - mx) ** 2).sum() / m - extra
    cyy = (img * (yy - my) ** 2).sum() / m - extra
    cxy = (img * (xx - mx) * (yy - my)).sum() / m
    return m / (4 * np.pi * np.sqrt(cxx * cyy - cxy**2))


@pytest.fixture(scope="module")
def geo():
    return make_geomnist(40, seed=5, variant="analytic")


def test_geomnist_shapes_and_determinism(geo):
    assert geo.images.shape == (120, 1, 32, 32) and geo.images.dtype == np.float32
    assert geo.images.min() >= 0 and geo.images.max() <= 1 and geo.images.max() > 0.99
    assert geo.classes == GEOMNIST_CLASSES == ("triangle", "rectangle", "ellipse")
    np.testing.assert_array_equal(geo.clean_labels, np.repeat([0, 1, 2], 40))
    np.testing.assert_array_equal(geo.labels, geo.clean_labels)
    assert geo.labels.dtype == np.int64
    assert 0 <= geo.angles.min() and geo.angles.max() <= 176 and geo.angles.std() > 30
    assert 0.9 <= geo.sigmas.min() and geo.sigmas.max() <= 1.1
    again = make_geomnist(40, seed=5, variant="analytic")
    np.testing.assert_array_equal(again.images, geo.images)
    other = make_geomnist(40, seed=6, variant="analytic")
    assert not np.array_equal(other.images, geo.images)
    noisy = make_geomnist(40, seed=5, p_err=0.5, variant="analytic")  # label noise leaves the images alone
    np.testing.assert_array_equal(noisy.images, geo.images)
    assert (noisy.labels != noisy.clean_labels).sum() == 60
    x, y = geo.to_tensors()
    assert x.shape == (120, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long


def test_geomnist_classes_are_the_shapes_they_name(geo):
    ratios = np.array([_area_over_moment_ellipse(im[0], s)
                       for im, s in zip(geo.images, geo.sigmas)])
    targets = np.array([3 * np.sqrt(3) / (2 * np.pi), 3 / np.pi, 1.0])
    nearest = np.argmin(np.abs(ratios[:, None] - targets[None, :]), axis=1)
    np.testing.assert_array_equal(nearest, geo.clean_labels)
    for k in range(3):
        assert abs(ratios[geo.clean_labels == k].mean() - targets[k]) < 0.01


def test_geomnist_sweeps_its_parameter(geo):
    areas = geo.images.sum(axis=(1, 2, 3))
    tri, rect, ell = areas[:40], areas[40:80], areas[80:]
    assert np.all(np.diff(tri) > 0) and np.all(np.diff(rect) > 0)  # size sweeps
    assert np.ptp(ell) / ell.mean() < 0.01  # the ellipse moves, it does not grow
    # the ellipse centre moves by 8 px from the first to the last
    def centre(img):
        yy, xx = np.mgrid[:32, :32]
        return np.array([(img * xx).sum(), (img * yy).sum()]) / img.sum()
    shift = centre(geo.images[-1, 0]) - centre(geo.images[80, 0])
    assert abs(np.hypot(*shift) - 8.0) < 0.1


def test_geomnist_image_size():
    g = make_geomnist(2, seed=0, image_size=64, variant="analytic")
    assert g.images.shape == (6, 1, 64, 64)
    g32 = make_geomnist(2, seed=0, variant="analytic")
    np.testing.assert_allclose(g.images.sum(axis=(1, 2, 3)) / 4, g32.images.sum(axis=(1, 2, 3)),
                               rtol=0.01)


# --------------------------------------------------------------------------------------------
# GeoMNIST as in Zhang, Wang & Su's code (the default variant)
# --------------------------------------------------------------------------------------------

def test_geomnist_variants_and_default():
    assert GEOMNIST_VARIANTS == ("zhang2021", "analytic")
    g = make_geomnist(3, seed=0)
    assert g.variant == "zhang2021" and g.images.shape == (9, 1, 32, 32)
    assert make_geomnist(3, seed=0, variant="analytic").variant == "analytic"
    with pytest.raises(ValueError, match="variant"):
        make_geomnist(3, variant="mnist")
    with pytest.raises(ValueError, match="32x32 pixels only"):
        make_geomnist(3, image_size=64)


def test_geomnist_zhang2021_pixel_areas_over_the_authors_sweep():
    """The unrotated shapes of the authors' 1,000-image sweep (500 train + 500 validation per
    class): triangles 209-230 pixels, rectangles 153, ellipses 147-299."""
    areas = [np.array([_zhang2021_mask(k, float(p)).sum() for p in _zhang2021_params(k, 1000)])
             for k in range(3)]
    assert (areas[0].min(), areas[0].max()) == (209, 230)
    assert set(areas[1].tolist()) == {153}
    assert (areas[2].min(), areas[2].max()) == (147, 299)
    assert np.all(np.diff(areas[2]) >= 0)            # the ellipse grows along its sweep


@pytest.mark.parametrize("d", [-1.0, -0.37, 0.0, 0.5, 1.0])
def test_geomnist_zhang2021_triangle_is_the_lattice_points_of_the_triangle(d):
    """Independent of the crossing test: every lattice point strictly inside the triangle
    (barycentric coordinates > 1e-9) is drawn, no point outside (< -1e-9) is."""
    mask = _zhang2021_mask(0, d)
    v = np.array([[16 + d, 16 - 8 * np.sqrt(3) + d], [26 + d, 24 + d], [6 + d, 24 + d]])
    rr, cc = np.mgrid[:32, :32].astype(float)
    t = np.linalg.inv(np.array([v[1] - v[0], v[2] - v[0]]).T)
    l1 = t[0, 0] * (rr - v[0, 0]) + t[0, 1] * (cc - v[0, 1])
    l2 = t[1, 0] * (rr - v[0, 0]) + t[1, 1] * (cc - v[0, 1])
    bary = np.minimum(np.minimum(l1, l2), 1 - l1 - l2)
    assert np.all(mask[bary > 1e-9]) and not np.any(mask[bary < -1e-9])
    # close to the area of the exact triangle, base 20 (rows) x height 8 + 8 sqrt 3 (columns) / 2
    exact = 0.5 * 20 * (8 + 8 * np.sqrt(3))
    assert abs(mask.sum() - exact) < 0.06 * exact


def test_geomnist_zhang2021_rectangle_and_ellipse_geometry():
    for d in (-1.0, -0.2, 0.6, 1.0):
        rows, cols = np.nonzero(_zhang2021_mask(1, d))
        assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (9, 17)
        assert rows.min() == np.round(12 + d) and cols.min() == np.round(8 + d)
    for a in (5.0, 6.0, 7.0):
        m = _zhang2021_mask(2, a)
        rows, cols = np.nonzero(m)
        assert abs(m.sum() - 2 * np.pi * a * a) < 0.07 * 2 * np.pi * a * a
        assert np.all(np.abs(rows - 16) < a) and np.all(np.abs(cols - 16) < 2 * a)
        assert np.array_equal(m, m[::-1][np.r_[31, 0:31]])  # symmetric about row 16


def _orientation_deg(img):
    """Angle of the major axis of the image's second moments, (x = column, y = row)."""
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    m = img.sum()
    mx, my = (img * xx).sum() / m, (img * yy).sum() / m
    cxx, cyy = (img * (xx - mx) ** 2).sum() / m, (img * (yy - my) ** 2).sum() / m
    cxy = (img * (xx - mx) * (yy - my)).sum() / m
    return np.degrees(0.5 * np.arctan2(2 * cxy, cxx - cyy))


def test_geomnist_zhang2021_rotation_sweep_blur_and_mass():
    n = 30
    g = make_geomnist(n, seed=2)
    np.testing.assert_array_equal(g.clean_labels, np.repeat([0, 1, 2], n))
    np.testing.assert_allclose(g.angles, np.tile(176.0 * np.arange(n) / n, 3), rtol=1e-14)
    np.testing.assert_allclose(g.sweep, np.tile(np.linspace(0, 1, n), 3))
    assert 0.9 <= g.sigmas.min() and g.sigmas.max() <= 1.1 and g.sigmas.std() > 0.03
    # rotation and blur keep the mass (the spline and the reflecting blur are mass-preserving
    # up to interpolation error) ...
    areas = np.concatenate([[_zhang2021_mask(k, float(p)).sum() for p in _zhang2021_params(k, n)]
                            for k in range(3)])
    np.testing.assert_allclose(g.images.sum(axis=(1, 2, 3)), areas, rtol=2e-3)
    # ... and the ellipse's major axis turns with the image index (clockwise in (col, row))
    theta = np.array([_orientation_deg(im[0].astype(np.float64)) for im in g.images[2 * n:]])
    diff = (theta + g.angles[2 * n:] + 90) % 180 - 90
    assert np.abs(diff).max() < 0.5
    assert g.images.min() > -0.1 and g.images.max() < 1.1 and g.images.max() > 0.95
    # deterministic per seed; label noise leaves the images alone
    np.testing.assert_array_equal(make_geomnist(n, seed=2).images, g.images)
    assert not np.array_equal(make_geomnist(n, seed=3).images, g.images)
    noisy = make_geomnist(n, seed=2, p_err=0.5)
    np.testing.assert_array_equal(noisy.images, g.images)
    assert (noisy.labels != noisy.clean_labels).sum() == 45


def test_geomnist_train_val_split_like_the_authors():
    tr, va = geomnist_train_val(20, 10, seed=4, p_err=0.3)
    full = make_geomnist(30, seed=4)
    assert tr.images.shape == (60, 1, 32, 32) and va.images.shape == (30, 1, 32, 32)
    np.testing.assert_array_equal(tr.clean_labels, np.repeat([0, 1, 2], 20))
    np.testing.assert_array_equal(va.labels, va.clean_labels)        # clean validation labels
    for k in range(3):                                               # a partition of the sweep
        s = np.concatenate([tr.sweep[tr.clean_labels == k], va.sweep[va.clean_labels == k]])
        np.testing.assert_allclose(np.sort(s), full.sweep[full.clean_labels == k])
        assert np.all(np.diff(tr.sweep[tr.clean_labels == k]) > 0)
        # exactly round(0.3 * 20) = 6 training labels of each class moved, 3 to each other class
        moved = tr.labels[(tr.clean_labels == k) & (tr.labels != k)]
        assert len(moved) == 6 and sorted(np.bincount(moved, minlength=3).tolist()) == [0, 3, 3]
    # each image is the full sweep's image with the same parameters
    rows = [int(np.flatnonzero((full.clean_labels == c) & np.isclose(full.sweep, s))[0])
            for c, s in zip(tr.clean_labels, tr.sweep)]
    np.testing.assert_array_equal(tr.images, full.images[rows])
    # the images and the split do not depend on p_err
    tr0, va0 = geomnist_train_val(20, 10, seed=4, p_err=0.0)
    np.testing.assert_array_equal(tr0.images, tr.images)
    np.testing.assert_array_equal(va0.images, va.images)
    np.testing.assert_array_equal(tr0.labels, tr0.clean_labels)
    with pytest.raises(ValueError, match="n_val"):
        geomnist_train_val(5, 0)


# --------------------------------------------------------------------------------------------
# Label noise
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes,sizes", [(3, (10, 37, 50)), (4, (9, 0, 21, 40))])
@pytest.mark.parametrize("p_err", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_label_noise_counts_are_exact(num_classes, sizes, p_err):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(num_classes), sizes))
    before = labels.copy()
    noisy = apply_label_noise(labels, p_err, num_classes, seed=4)
    np.testing.assert_array_equal(labels, before)
    assert noisy.dtype == np.int64
    for k, n_k in enumerate(sizes):
        moved = noisy[labels == k]
        moved = moved[moved != k]
        assert moved.size == round(p_err * n_k)
        counts = np.bincount(moved, minlength=num_classes)
        counts = np.delete(counts, k)
        assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(noisy, apply_label_noise(labels, p_err, num_classes, seed=4))


def test_label_noise_two_thirds_is_random_labels():
    labels = np.repeat([0, 1, 2], 300)
    noisy = apply_label_noise(labels, 2 / 3, 3, seed=1)
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (labels, noisy), 1)
    np.testing.assert_array_equal(confusion, np.full((3, 3), 100))
    # which samples move depends on the seed
    assert not np.array_equal(noisy, apply_label_noise(labels, 2 / 3, 3, seed=2))


def test_label_noise_errors():
    with pytest.raises(ValueError, match="p_err"):
        apply_label_noise([0, 1], 1.5, 2)
    with pytest.raises(ValueError, match="0..1"):
        apply_label_noise([0, 2], 0.1, 2)


# --------------------------------------------------------------------------------------------
# scikit-learn's digits
# --------------------------------------------------------------------------------------------
def test_digits_train_and_test_parts_are_disjoint_for_every_seed():
    from sklearn.datasets import load_digits as sk_digits
    from lesde.data import load_digits

    X, Y = sk_digits(return_X_y=True)
    key = {X[i].tobytes(): Y[i] for i in range(len(Y))}
    assert len(key) == len(Y)                            # every image is unique: a fair key
    whole_tr = load_digits(split="train")[0]
    whole_te = load_digits(split="test")[0]
    assert len(whole_tr) + len(whole_te) == len(Y)
    tr = {(r * 16).round().tobytes() for r in whole_tr.astype(np.float64)}
    for seed in (0, 1, 7):
        xt, yt = load_digits([3, 5], 20, split="test", seed=seed)
        assert xt.shape == (40, 64) and np.array_equal(yt, np.repeat([0, 1], 20))
        for row, lab in zip((xt.astype(np.float64) * 16).round(), yt):
            assert row.tobytes() not in tr                # never a train image
            assert key[row.tobytes()] == (3, 5)[lab]      # labels follow the classes' order
    a = load_digits([3, 5], 20, split="train", seed=4)[0]
    np.testing.assert_array_equal(a, load_digits([3, 5], 20, split="train", seed=4)[0])
    assert not np.array_equal(a, load_digits([3, 5], 20, split="train", seed=5)[0])
    with pytest.raises(ValueError, match="only .* images of digit 3"):
        load_digits([3], 1000, split="test")
    assert len(load_digits([3], 1000, split="test", at_most=True)[1]) < 60
    with pytest.raises(ValueError, match="digits 0-9 as classes"):
        load_digits(["cat"])
    with pytest.raises(ValueError, match="split"):
        load_digits(split="val")
