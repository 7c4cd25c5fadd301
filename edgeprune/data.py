"""Datasets for search and training: the embedded default, an ImageFolder directory, or a `.npz` file.

The default, `builtin:digit-scenes`, needs no download: scikit-learn ships the UCI handwritten digits (1797 images,
8x8), and each scene places one digit, scaled, tinted and shifted, over a textured background with a faint
distractor digit. Splits are by source digit, so no test digit was ever seen in training.

Every dataset is kept as uint8 images (N, H, W, 3) at its native resolution; `tensors` resizes to the resolution a
subnet runs at. All splits are fixed by a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import UserError

DEFAULT = "builtin:digit-scenes"
NATIVE = 128  # resolution the built-in scenes are rendered at
SPLIT = (0.7, 0.15, 0.15)  # train, val, test
MEAN, STD = 127.5, 64.0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp"}


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: tuple[np.ndarray, np.ndarray]  # (uint8 N,H,W,3, int64 N)
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]

    @property
    def native(self) -> int:
        return int(self.train[0].shape[1])


def load(spec: str | Path | None = None, seed: int = 0) -> Dataset:
    """`builtin:digit-scenes` (default), a directory of class folders, or a `.npz` with `x` and `y`."""
    spec = str(spec or DEFAULT)
    if spec == DEFAULT:
        return digit_scenes(seed)
    if spec.startswith("builtin:"):
        raise UserError(f"unknown built-in dataset '{spec}'; the built-in one is {DEFAULT}")
    path = Path(spec)
    if path.is_dir():
        x, y, classes = _image_folder(path)
    elif path.suffix == ".npz" and path.is_file():
        x, y, classes = _npz(path)
    else:
        raise UserError(f"{spec} is neither a directory of class folders nor a .npz file; pass --data DIR, "
                        f"--data FILE.npz, or leave --data out for {DEFAULT}")
    if len(classes) < 2 or len(y) < 20 * len(classes) // 4:
        raise UserError(f"{spec} has {len(y)} images in {len(classes)} classes; give at least 2 classes and "
                        "a few images of each")
    return _split(spec, classes, x, y, seed)


def _split(name: str, classes: list[str], x: np.ndarray, y: np.ndarray, seed: int) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(y))
    a = int(SPLIT[0] * len(y))
    b = a + int(SPLIT[1] * len(y))
    parts = [order[:a], order[a:b], order[b:]]
    return Dataset(name, classes, *[(x[p], y[p]) for p in parts])


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as f:  # never unpickle a user's file
            x, y = f["x"], f["y"]
            classes = [str(c) for c in f["classes"]] if "classes" in f else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} must hold arrays 'x' (N,H,W,3 or N,3,H,W) and 'y' (N labels) ({e})") from None
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[1] != x.shape[2] or len(x) != len(y):
        raise UserError(f"{path}: 'x' must be N square images (N,H,W,3 or N,3,H,W), 'y' one label each; "
                        f"got x {list(x.shape)}, y {list(y.shape)}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.dtype != np.uint8:  # floats in [0, 1] or [0, 255]
        x = np.clip(x * (255.0 if float(x.max()) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    labels, y = np.unique(np.asarray(y), return_inverse=True)
    return x, y.astype(np.int64), classes or [str(v) for v in labels]


def _image_folder(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    xs.append(np.asarray(im.convert("RGB").resize((NATIVE, NATIVE), Image.BILINEAR)))
            except OSError as e:
                raise UserError(f"cannot read image {f} ({e}); remove it or convert it to PNG/JPEG") from None
            ys.append(label)
    if not xs:
        raise UserError(f"{path} has no images in class folders ({path}/<class>/<image>.png)")
    return np.stack(xs), np.array(ys, dtype=np.int64), classes


@lru_cache(maxsize=2)  # rendering takes a few seconds; a run loads it once
def digit_scenes(seed: int = 0, per_digit: tuple[int, int, int] = (3, 3, 3)) -> Dataset:
    """Scenes rendered from scikit-learn's digits; train/val/test by source digit, `per_digit` scenes each."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    a, b = int(SPLIT[0] * len(order)), int((SPLIT[0] + SPLIT[1]) * len(order))
    splits = []
    for i, idx in enumerate((order[:a], order[a:b], order[b:])):
        rng = np.random.default_rng([seed, i])
        idx = np.repeat(idx, per_digit[i])
        splits.append((np.stack([_scene(images[j], images[rng.integers(len(images))], rng) for j in idx]),
                       labels[idx]))
    return Dataset(DEFAULT, [str(d) for d in range(10)], *splits)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


_GRID = np.mgrid[0:NATIVE, 0:NATIVE].astype(np.float32) / NATIVE


def _scene(digit: np.ndarray, distractor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = NATIVE
    yy, xx = _GRID
    tint = rng.uniform(0.7, 1.0, 3).astype(np.float32)  # a weak colour cast
    c0, c1 = rng.uniform(110, 255, 2)  # a light background, dark ink: one polarity keeps training short
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.5)[..., None]
    freq = rng.uniform(4, 16)
    texture = 8 * np.sin(2 * np.pi * freq * (xx * np.cos(angle + 1) + yy * np.sin(angle + 1)))[..., None]
    img = (c0 * (1 - ramp) + c1 * ramp) * tint + texture + 6 * rng.standard_normal((n, n, 3), dtype=np.float32)
    for glyph, alpha, (lo, hi) in ((distractor, 0.25, (0.15, 0.25)), (digit, 1.0, (0.45, 0.8))):
        size = int(rng.uniform(lo, hi) * n)
        mask = np.clip(_resize(glyph, size), 0, 1)[..., None] * alpha
        y0, x0 = rng.integers(0, n - size + 1, 2)
        ink = rng.uniform(0, 70) * tint
        img[y0:y0 + size, x0:x0 + size] = img[y0:y0 + size, x0:x0 + size] * (1 - mask) + ink * mask
    return np.clip(img, 0, 255).astype(np.uint8)


def tensors(x: np.ndarray, resolution: int):
    """uint8 (N,H,W,3) -> normalized float32 torch tensor (N,3,r,r), resized with antialiasing."""
    import torch

    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().sub_(MEAN).div_(STD)
    if t.shape[-1] != resolution:
        t = torch.nn.functional.interpolate(t, size=(resolution, resolution), mode="bilinear",
                                            align_corners=False, antialias=True)
    return t.contiguous()


def batches(x: np.ndarray, y: np.ndarray, batch: int, rng: np.random.Generator | None = None):
    """Index batches over (x, y), shuffled when rng is given."""
    order = rng.permutation(len(y)) if rng is not None else np.arange(len(y))
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        yield x[idx], y[idx]
