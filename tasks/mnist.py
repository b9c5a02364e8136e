"""MNIST's IDX files: reading them (checked: gzip CRC, IDX header, sizes), fetching the official ones
(checked by MD5), and the train/test arrays of the standard or the offline split (tasks/mnist_omnigrok.py).

Pure numpy; no torch, no Lightning.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request

import numpy as np

from harness.errors import ConfigError

MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# MD5 of the official .gz files (as the mirror serves them; a re-compressed copy differs, so only
# downloads are checked against these, and local files by gzip CRC + IDX header instead).
OFFICIAL = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}


def _how_to_get(name: str) -> str:
    return f"get {name}.gz from {MIRROR} (or run with data.download=true on a machine that can reach it)"


def find_idx(folder: str, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped or not) -> uint8 array: images [n, 28, 28], labels [n]."""
    name = os.path.basename(path).removesuffix(".gz")
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()  # gzip checks its CRC here: a truncated or damaged file raises
    except (OSError, EOFError) as e:
        raise ConfigError(f"MNIST file {path} is corrupt ({e}): {_how_to_get(name)}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 3:
        raise ConfigError(f"MNIST file {path} is corrupt (not an IDX uint8 header): {_how_to_get(name)}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise ConfigError(
            f"MNIST file {path} is corrupt ({len(body)} data bytes for shape {shape}): {_how_to_get(name)}"
        )
    arr = np.frombuffer(body, dtype=np.uint8).reshape(shape)
    if ndim == 1 and arr.max(initial=0) > 9:
        raise ConfigError(f"MNIST file {path} is corrupt (label {arr.max()} > 9): {_how_to_get(name)}")
    return arr


def download(folder: str, name: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".gz")
    try:
        with urllib.request.urlopen(MIRROR + name + ".gz", timeout=60) as r:
            blob = r.read()
    except OSError as e:
        raise ConfigError(f"cannot download {MIRROR}{name}.gz ({e}): copy the file to {folder} by hand") from None
    if hashlib.md5(blob).hexdigest() != OFFICIAL[name]:
        raise ConfigError(f"downloaded {name}.gz fails its MD5 check: try again, or copy it to {folder} by hand")
    with open(path, "wb") as f:
        f.write(blob)
    return path


def load_mnist(
    folder: str, split: str = "auto", n_train: int = 1000, n_test: int = 0, allow_download: bool = False
) -> dict:
    """{'x_train' uint8 [n_train, 784], 'y_train' [n_train], 'x_test', 'y_test', 'split'}."""
    files = {name: find_idx(folder, name) for name in OFFICIAL}
    have_train = files["train-images-idx3-ubyte"] and files["train-labels-idx1-ubyte"]
    if split == "auto":
        split = "standard" if have_train or allow_download else "offline"
    needed = list(OFFICIAL) if split == "standard" else [n for n in OFFICIAL if n.startswith("t10k")]
    for name in needed:
        if files[name] is None:
            if not allow_download:
                raise ConfigError(
                    f"MNIST file {os.path.join(folder, name)}.gz is missing (data.split={split}): {_how_to_get(name)}"
                )
            files[name] = download(folder, name)
    x_test = read_idx(files["t10k-images-idx3-ubyte"]).reshape(-1, 784)
    y_test = read_idx(files["t10k-labels-idx1-ubyte"])
    if split == "standard":
        x_train = read_idx(files["train-images-idx3-ubyte"]).reshape(-1, 784)[:n_train]
        y_train = read_idx(files["train-labels-idx1-ubyte"])[:n_train]
    else:
        if n_train >= len(x_test):
            raise ConfigError(
                f"data.n_train={n_train}: the offline split trains on part of the "
                f"{len(x_test)} test images and needs some left to evaluate on"
            )
        x_train, y_train = x_test[:n_train], y_test[:n_train]
        x_test, y_test = x_test[n_train:], y_test[n_train:]
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ConfigError(
            f"MNIST files in {folder} disagree on the number of images and labels: "
            f"{_how_to_get('t10k-images-idx3-ubyte')}"
        )
    if n_test:
        x_test, y_test = x_test[:n_test], y_test[:n_test]
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "split": split}
