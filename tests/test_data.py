"""Tests of fedhive.data: partitioners and data set loaders."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhive.common.errors import ConfigError
from fedhive.data import (
    Dataset,
    Partition,
    datasets,
    dirichlet,
    format_partition_table,
    from_arrays,
    iid,
    load_dataset,
    load_digits,
    load_folder,
    load_mnist1d,
    natural,
    quantity_skew,
    shards,
    synthetic,
)


def balanced_labels(num_classes: int = 10, per_class: int = 100, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def assert_exact_cover(partition: Partition, n: int) -> None:
    """Every index in [0, n) appears in exactly one client, with int64 arrays."""
    assert all(ix.dtype == np.int64 for ix in partition.indices)
    joined = np.concatenate(partition.indices)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def mean_label_entropy(partition: Partition, labels: np.ndarray, num_classes: int) -> float:
    hist = partition.label_histograms(labels, num_classes).astype(np.float64)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return float(terms.sum(axis=1).mean())


def same_partition(a: Partition, b: Partition) -> bool:
    return len(a.indices) == len(b.indices) and all(
        np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=True)
    )


# --------------------------------------------------------------------------- import hygiene


def test_import_does_not_pull_heavy_dependencies() -> None:
    code = (
        "import sys, fedhive.data, fedhive.models\n"
        "bad = [m for m in ('torch', 'sklearn', 'mnist1d') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --------------------------------------------------------------------------- partitioners


def test_iid_covers_and_balances() -> None:
    part = iid(1003, 10, seed=0)
    assert_exact_cover(part, 1003)
    assert part.sizes.max() - part.sizes.min() <= 1
    assert part.num_clients == 10


def test_dirichlet_covers_and_respects_min_size() -> None:
    labels = balanced_labels(per_class=200)
    part = dirichlet(labels, 20, alpha=0.5, seed=1, min_size=20)
    assert_exact_cover(part, len(labels))
    assert part.sizes.min() >= 20
    assert part.label_histograms(labels, 10).sum() == len(labels)


def test_smaller_alpha_gives_more_label_skew() -> None:
    labels = balanced_labels(per_class=300)
    entropies = [
        mean_label_entropy(dirichlet(labels, 20, alpha=a, seed=3, min_size=5), labels, 10)
        for a in (0.1, 1.0, 100.0)
    ]
    assert entropies[0] < entropies[1] < entropies[2]
    assert entropies[2] > 0.95 * np.log(10)


def test_dirichlet_impossible_min_size_fails_clearly() -> None:
    labels = balanced_labels(per_class=20)
    with pytest.raises(ConfigError, match="min_size"):
        dirichlet(labels, 50, alpha=0.01, seed=0, min_size=4)
    with pytest.raises(ConfigError, match="needs"):
        dirichlet(labels, 10, alpha=1.0, seed=0, min_size=50)


def test_shards_give_at_most_two_labels_per_client() -> None:
    labels = balanced_labels(per_class=100)
    part = shards(labels, 50, shards_per_client=2, seed=0)
    assert_exact_cover(part, len(labels))
    hist = part.label_histograms(labels, 10)
    assert ((hist > 0).sum(axis=1) <= 2).all()
    assert (part.sizes == 20).all()


def test_shards_cover_uneven_sizes() -> None:
    labels = np.random.default_rng(0).integers(0, 5, size=997)
    part = shards(labels, 7, shards_per_client=3, seed=2)
    assert_exact_cover(part, 997)


def test_quantity_skew_sizes_are_unequal() -> None:
    part = quantity_skew(5000, 20, seed=0, sigma=1.5, min_size=5)
    assert_exact_cover(part, 5000)
    assert part.sizes.min() >= 5
    assert part.sizes.max() > 3 * part.sizes.min()
    flat = quantity_skew(5000, 20, seed=0, sigma=0.0)
    assert flat.sizes.max() - flat.sizes.min() < 0.25 * flat.sizes.mean()


def test_natural_groups() -> None:
    groups = np.array(["b", "a", "c", "a", "b", "a"])
    part = natural(groups)
    assert [ix.tolist() for ix in part.indices] == [[1, 3, 5], [0, 4], [2]]
    assert_exact_cover(part, len(groups))


@pytest.mark.parametrize(
    "make",
    [
        lambda s: iid(500, 7, seed=s),
        lambda s: dirichlet(balanced_labels(), 10, alpha=0.3, seed=s, min_size=5),
        lambda s: shards(balanced_labels(), 10, seed=s),
        lambda s: quantity_skew(500, 7, seed=s),
    ],
)
def test_partitioners_are_seeded(make: object) -> None:
    assert callable(make)
    assert same_partition(make(5), make(5))
    assert not same_partition(make(5), make(6))


@pytest.mark.parametrize(
    "call",
    [
        lambda: iid(10, 0, seed=0),
        lambda: iid(10, 11, seed=0),
        lambda: iid(10, 2.5, seed=0),  # type: ignore[arg-type]
        lambda: dirichlet(balanced_labels(), 10, alpha=0.0, seed=0),
        lambda: dirichlet(balanced_labels(), 10, alpha=-1.0, seed=0),
        lambda: dirichlet(balanced_labels(), 10, alpha=float("nan"), seed=0),
        lambda: dirichlet(balanced_labels().astype(float), 10, alpha=1.0, seed=0),
        lambda: dirichlet(-balanced_labels() - 1, 10, alpha=1.0, seed=0),
        lambda: shards(balanced_labels(), 10, shards_per_client=0, seed=0),
        lambda: shards(np.arange(10), 6, shards_per_client=2, seed=0),
        lambda: quantity_skew(100, 10, seed=0, sigma=-1.0),
        lambda: quantity_skew(100, 10, seed=0, min_size=11),
        lambda: natural(np.array([])),
    ],
)
def test_bad_partition_arguments(call: object) -> None:
    assert callable(call)
    with pytest.raises(ConfigError):
        call()


def test_format_partition_table() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    part = Partition([np.array([0, 1, 2]), np.array([3, 4, 5])])
    table = format_partition_table(part, labels, 3)
    lines = table.splitlines()
    assert lines[0].split() == ["client", "size", "labels", "0", "1", "2"]
    assert lines[2].split() == ["0", "3", "2", "2", "1", "0"]
    assert lines[3].split() == ["1", "3", "1", "0", "0", "3"]
    assert "2 clients, 6 samples" in lines[-1]
    short = format_partition_table(part, labels, 3, max_rows=1)
    assert "1 more clients" in short


# --------------------------------------------------------------------------- datasets


def test_mnist1d_generates_caches_and_keeps_global_rng(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.random.seed(1234)
    random.seed(99)
    expected_np, expected_py = np.random.random(5), random.random()
    np.random.seed(1234)
    random.seed(99)
    data = load_mnist1d(num_samples=1000, seed=3, cache_dir=tmp_path)
    np.testing.assert_array_equal(np.random.random(5), expected_np)
    assert random.random() == expected_py

    assert data.x_train.shape == (800, 40) and data.x_test.shape == (200, 40)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.num_classes == 10 and set(np.unique(data.y_train)) <= set(range(10))
    assert len(list(tmp_path.glob("mnist1d_*.npz"))) == 1

    def refuse(args: object) -> object:
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(datasets, "_generate_mnist1d", refuse)
    again = load_mnist1d(num_samples=1000, seed=3, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.x_train, data.x_train)
    np.testing.assert_array_equal(again.y_test, data.y_test)


def test_mnist1d_cache_dir_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDHIVE_CACHE", str(tmp_path / "env"))
    assert datasets.default_cache_dir() == tmp_path / "env"
    data = load_dataset("mnist1d", num_samples=100, seed=0)
    assert data.num_train == 80
    assert len(list((tmp_path / "env").glob("*.npz"))) == 1


def test_mnist1d_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_mnist1d(num_samples=5, cache_dir=tmp_path)


def test_digits() -> None:
    data = load_digits(seed=0)
    assert data.x_train.shape[1:] == (64,) and data.x_train.dtype == np.float32
    assert data.num_train + data.num_test == 1797
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    assert abs(data.num_test / 1797 - 0.2) < 0.01
    assert np.array_equal(load_digits(seed=0).y_test, data.y_test)


def test_synthetic_shapes_and_determinism() -> None:
    data = synthetic(1.0, 1.0, num_devices=8, dim=20, num_classes=5, seed=4)
    assert data.x_train.shape[1:] == (20,) and data.num_classes == 5
    assert data.client_ids_train is not None and data.client_ids_test is not None
    per_device = np.bincount(data.client_ids_train, minlength=8) + np.bincount(
        data.client_ids_test, minlength=8
    )
    assert (per_device >= 50).all()
    assert len(data.client_ids_train) == data.num_train
    part = natural(data.client_ids_train)
    assert part.num_clients == 8
    again = synthetic(1.0, 1.0, num_devices=8, dim=20, num_classes=5, seed=4)
    np.testing.assert_array_equal(again.x_train, data.x_train)
    other = synthetic(1.0, 1.0, num_devices=8, dim=20, num_classes=5, seed=5)
    assert other.num_train != data.num_train or not np.array_equal(other.x_train, data.x_train)


def test_synthetic_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        synthetic(-1.0, 1.0)
    with pytest.raises(ConfigError):
        synthetic(1.0, 1.0, num_devices=0)


def test_from_arrays_coerces_and_validates() -> None:
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    data = from_arrays(x[:4], [0, 1, 2, 1], x[4:], [2, 0])
    assert data.x_train.dtype == np.float32 and data.y_test.dtype == np.int64
    assert data.num_classes == 3 and data.name == "user"
    with pytest.raises(ConfigError):
        from_arrays(x[:4], [0, 1], x[4:], [0, 1])
    with pytest.raises(ConfigError):
        from_arrays(x[:4], [0.5, 1, 2, 1], x[4:], [0, 1])
    with pytest.raises(ConfigError):
        from_arrays(x[:4], [0, 1, 2, 1], x[4:], [0, 1], num_classes=2)
    with pytest.raises(ConfigError):
        from_arrays(x[:4], [0, 1, 2, 1], np.zeros((2, 3)), [0, 1])


def test_from_torch_dataset() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import TensorDataset

    x = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    y = torch.tensor([0, 1] * 5)
    data = datasets.from_torch_dataset(TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:]))
    np.testing.assert_array_equal(data.x_train, x[:8].numpy())
    assert data.y_test.tolist() == [0, 1] and data.num_classes == 2


def test_load_folder_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.normal(size=(10, 3)), y=np.arange(10) % 3)
    np.savez(tmp_path / "test.npz", x=rng.normal(size=(4, 3)), y=np.array([0, 1, 2, 0]))
    data = load_dataset("folder", path=tmp_path)
    assert data.x_train.shape == (10, 3) and data.num_classes == 3
    assert data.name == tmp_path.name


def test_load_folder_csv(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("a,b,label\n0.5,1,0\n1.5,2,1\n2.5,3,1\n")
    (tmp_path / "test.csv").write_text("a,b,label\n0.1,0.2,1\n")
    data = load_folder(tmp_path)
    np.testing.assert_allclose(data.x_train, [[0.5, 1], [1.5, 2], [2.5, 3]])
    assert data.y_train.tolist() == [0, 1, 1] and data.x_test.shape == (1, 2)


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return folder


def test_load_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_folder(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"train\.npz"):
        load_folder(_write(tmp_path / "empty", "README", "hi"))
    with pytest.raises(ConfigError, match=r"missing test\.csv"):
        load_folder(_write(tmp_path / "half", "train.csv", "a,label\n1,0\n"))
    bad_header = _write(tmp_path / "hdr", "train.csv", "a,b,target\n1,2,0\n")
    _write(bad_header, "test.csv", "a,b,target\n1,2,0\n")
    with pytest.raises(ConfigError, match="label"):
        load_folder(bad_header)
    not_numeric = _write(tmp_path / "txt", "train.csv", "a,label\nx,0\n")
    _write(not_numeric, "test.csv", "a,label\n1,0\n")
    with pytest.raises(ConfigError, match="numeric"):
        load_folder(not_numeric)
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "train.npz", features=np.zeros((2, 2)), y=np.zeros(2, dtype=int))
    np.savez(npz / "test.npz", x=np.zeros((2, 2)), y=np.zeros(2, dtype=int))
    with pytest.raises(ConfigError, match=r"lacks array\(s\) \['x'\]"):
        load_folder(npz)
    (npz / "train.npz").write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="cannot read"):
        load_folder(npz)


def test_load_dataset_registry() -> None:
    with pytest.raises(ConfigError, match="digits"):
        load_dataset("cifar10")
    with pytest.raises(ConfigError, match="bad arguments"):
        load_dataset("digits", size=3)
    data = load_dataset("synthetic", alpha=0.5, beta=0.5, num_devices=3, seed=1)
    assert isinstance(data, Dataset) and data.name == "synthetic(0.5,0.5)"
