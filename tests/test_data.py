"""Datasets: the embedded default, .npz files and ImageFolder directories; seeded splits; clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune import data
from edgeprune.errors import UserError


def _npz(path, n=60, classes=3, layout="nhwc", dtype=np.uint8):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3)).astype(dtype)
    if dtype != np.uint8:
        x = x / 255.0
    if layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    np.savez(path, x=x, y=np.arange(n) % classes)
    return path


@pytest.mark.parametrize("layout,dtype", [("nhwc", np.uint8), ("nchw", np.float32)])
def test_npz_splits_are_fixed_by_seed_and_disjoint(tmp_path, layout, dtype):
    path = _npz(tmp_path / "d.npz", layout=layout, dtype=dtype)
    a, b, c = data.load(path, seed=1), data.load(path, seed=1), data.load(path, seed=2)
    assert a.classes == ["0", "1", "2"] and a.native == 32
    assert a.train[0].dtype == np.uint8 and a.train[0].shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(a.test[0], b.test[0])
    assert not np.array_equal(a.test[0], c.test[0])
    sizes = [len(s[1]) for s in (a.train, a.val, a.test)]
    assert sum(sizes) == 60 and sizes[0] == 42
    rows = {r.tobytes() for s in (a.train, a.val, a.test) for r in s[0]}
    assert len(rows) == 60  # disjoint and complete


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = data.load(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert ds.native == data.NATIVE and sum(len(s[1]) for s in (ds.train, ds.val, ds.test)) == 24


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "missing", "neither a directory"),
    (lambda p: (np.savez(p / "a.npz", x=np.zeros((4, 8, 8, 3))), p / "a.npz")[1], "'y'"),
    (lambda p: (np.savez(p / "o.npz", x=np.array([object()] * 4, dtype=object), y=np.zeros(4)), p / "o.npz")[1],
     "must hold"),
    (lambda p: (np.savez(p / "s.npz", x=np.zeros((4, 8, 9, 3)), y=np.zeros(4)), p / "s.npz")[1], "square"),
    (lambda p: "builtin:cifar", "unknown built-in"),
])
def test_bad_data_is_one_clear_error(tmp_path, make, needle):
    with pytest.raises(UserError, match=needle):
        data.load(make(tmp_path))


def test_default_scenes_split_by_source_digit():
    ds = data.digit_scenes(0)
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.train[0].shape[1:] == (data.NATIVE, data.NATIVE, 3)
    assert len(ds.val[1]) == len(ds.test[1]) > 500
    assert set(np.bincount(ds.test[1])) and np.bincount(ds.test[1]).min() > 30  # every class is tested
    t = data.tensors(ds.val[0][:4], 64)
    assert t.shape == (4, 3, 64, 64) and abs(float(t.mean())) < 1.5
