"""Built-in data sets and loaders for user data.

Every loader returns a :class:`Dataset`: ``x`` as ``float32`` with samples on axis 0, ``y``
as ``int64`` labels in ``[0, num_classes)``. Optional packages (``mnist1d``,
``scikit-learn``, ``torch``) are imported only inside the functions that need them.

Built-in sets:

- ``"mnist1d"``: :func:`load_mnist1d`, generated locally by the ``mnist1d`` package
  (Greydanus 2020), cached as ``.npz``.
- ``"digits"``: :func:`load_digits`, scikit-learn's 8x8 handwritten digits.
- ``"synthetic"``: :func:`synthetic`, FedProx's Synthetic(alpha, beta) (Li et al. 2020).
- ``"folder"``: :func:`load_folder`, a folder of ``.npz`` or ``.csv`` files.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedhive.common.atomic import atomic_open
from fedhive.common.errors import ConfigError, MissingDependency
from fedhive.data._validate import check_float, check_int

__all__ = [
    "DATASETS",
    "Dataset",
    "default_cache_dir",
    "from_arrays",
    "from_torch_dataset",
    "load_dataset",
    "load_digits",
    "load_folder",
    "load_mnist1d",
    "synthetic",
]

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]

#: Bumped whenever the cached ``.npz`` layout of a generated data set changes.
_CACHE_VERSION = 1


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test data set held in memory as numpy arrays.

    ``client_ids_train`` / ``client_ids_test`` (optional) give each sample's owner, for the
    natural partition (:func:`fedhive.data.partition.natural`).
    """

    x_train: FloatArray
    y_train: LabelArray
    x_test: FloatArray
    y_test: LabelArray
    num_classes: int
    name: str
    client_ids_train: LabelArray | None = None
    client_ids_test: LabelArray | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x = np.ascontiguousarray(getattr(self, f"x_{split}"), dtype=np.float32)
            y = _check_labels(getattr(self, f"y_{split}"), f"y_{split}")
            if x.ndim < 1 or x.shape[0] != y.shape[0]:
                raise ConfigError(
                    f"x_{split} has shape {x.shape} but y_{split} has {y.shape[0]} labels"
                )
            object.__setattr__(self, f"x_{split}", x)
            object.__setattr__(self, f"y_{split}", y)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ConfigError(
                f"train samples have shape {self.x_train.shape[1:]} "
                f"but test samples have {self.x_test.shape[1:]}"
            )
        self._check_num_classes()
        self._check_client_ids()

    def _check_num_classes(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ConfigError(f"num_classes must be an int, got {self.num_classes!r}")
        top = max([int(y.max()) for y in (self.y_train, self.y_test) if y.size], default=-1)
        if self.num_classes < 1 or top >= self.num_classes:
            raise ConfigError(
                f"num_classes={self.num_classes} but labels go up to {top} "
                f"(labels must lie in [0, num_classes))"
            )

    def _check_client_ids(self) -> None:
        for split in ("train", "test"):
            ids = getattr(self, f"client_ids_{split}")
            if ids is None:
                continue
            ids = np.asarray(ids)
            if ids.shape != (len(getattr(self, f"y_{split}")),):
                raise ConfigError(
                    f"client_ids_{split} has shape {ids.shape}; expected one id per {split} sample"
                )
            object.__setattr__(self, f"client_ids_{split}", ids)

    @property
    def client_ids(self) -> LabelArray | None:
        """Alias of ``client_ids_train`` (the groups used to partition the training set)."""
        return self.client_ids_train

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(40,)`` for MNIST-1D."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.num_train}, test={self.num_test}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def _check_labels(y: Any, what: str) -> LabelArray:
    """1-D non-negative integer labels as int64 (integral floats are accepted)."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ConfigError(f"{what} must be 1-D, got shape {arr.shape}")
    integral = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and bool(np.all(arr == np.round(arr)))
    )
    if arr.size and not integral:
        raise ConfigError(f"{what} must hold integer class labels, got dtype {arr.dtype}")
    labels = arr.astype(np.int64)
    if labels.size and int(labels.min()) < 0:
        raise ConfigError(f"{what} must be >= 0, got {int(labels.min())}")
    return labels


def _infer_num_classes(*labels: LabelArray) -> int:
    return max([int(y.max()) + 1 for y in labels if y.size], default=1)


# --------------------------------------------------------------------------- user data


def from_arrays(
    x_train: npt.ArrayLike,
    y_train: npt.ArrayLike,
    x_test: npt.ArrayLike,
    y_test: npt.ArrayLike,
    name: str = "user",
    num_classes: int | None = None,
) -> Dataset:
    """Wrap in-memory arrays; ``num_classes`` defaults to the largest label + 1."""
    ytr = _check_labels(y_train, "y_train")
    yte = _check_labels(y_test, "y_test")
    classes = _infer_num_classes(ytr, yte) if num_classes is None else num_classes
    return Dataset(
        x_train=np.asarray(x_train, dtype=np.float32),
        y_train=ytr,
        x_test=np.asarray(x_test, dtype=np.float32),
        y_test=yte,
        num_classes=classes,
        name=name,
    )


def from_torch_dataset(train_ds: Any, test_ds: Any, name: str = "torch") -> Dataset:
    """Stack the ``(x, y)`` items of two torch data sets into numpy arrays.

    Map-style data sets (with ``__len__`` and ``__getitem__``) are read by index
    ``0 .. len - 1``; others are iterated. Tensors are moved to the CPU and copied; the
    whole data set must fit in memory. torch itself is not imported.
    """
    x_train, y_train = _stack_items(train_ds, "train_ds")
    x_test, y_test = _stack_items(test_ds, "test_ds")
    return from_arrays(x_train, y_train, x_test, y_test, name=name)


def _items(dataset: Any) -> Iterable[Any]:
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return (dataset[i] for i in range(len(dataset)))
    if hasattr(dataset, "__iter__"):
        return iter(dataset)
    raise ConfigError(f"expected a torch data set, got {type(dataset).__name__}")


def _stack_items(dataset: Any, what: str) -> tuple[FloatArray, LabelArray]:
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for item in _items(dataset):
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ConfigError(f"{what} must yield (x, y) pairs, got {type(item).__name__}")
        xs.append(_to_numpy(item[0]))
        ys.append(int(_to_numpy(item[1]).reshape(())))
    if not xs:
        raise ConfigError(f"{what} is empty")
    try:
        x = np.stack(xs).astype(np.float32)
    except ValueError as exc:
        raise ConfigError(f"{what}: samples differ in shape ({exc})") from exc
    return x, np.asarray(ys, dtype=np.int64)


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array, without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def load_folder(path: str | os.PathLike[str], name: str | None = None) -> Dataset:
    """Load a data set from a folder, in one of two layouts.

    - ``train.npz`` and ``test.npz``, each with arrays ``x`` (samples on axis 0) and ``y``
      (integer labels);
    - ``train.csv`` and ``test.csv``, comma-separated with one header line whose last
      column is ``label``; every other column is a numeric feature.

    ``.npz`` files are read with ``allow_pickle=False``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"data folder {str(folder)!r} does not exist or is not a folder")
    if (folder / "train.npz").exists() or (folder / "test.npz").exists():
        splits = [_read_npz_split(folder / f"{s}.npz") for s in ("train", "test")]
    elif (folder / "train.csv").exists() or (folder / "test.csv").exists():
        splits = [_read_csv_split(folder / f"{s}.csv") for s in ("train", "test")]
    else:
        raise ConfigError(
            f"data folder {str(folder)!r} must contain train.npz and test.npz "
            "(arrays x and y) or train.csv and test.csv (header, last column 'label')"
        )
    (x_train, y_train), (x_test, y_test) = splits
    return from_arrays(x_train, y_train, x_test, y_test, name=name or folder.name)


def _read_npz_split(file: Path) -> tuple[np.ndarray, np.ndarray]:
    if not file.exists():
        raise ConfigError(f"missing {file.name} in {str(file.parent)!r}")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {str(file)!r} as .npz: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ConfigError(f"{str(file)!r} is a single array, not an .npz archive with x and y")
    with loaded:
        missing = {"x", "y"} - set(loaded.files)
        if missing:
            raise ConfigError(
                f"{str(file)!r} lacks array(s) {sorted(missing)}; it has {sorted(loaded.files)}"
            )
        try:
            x, y = loaded["x"], loaded["y"]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read arrays of {str(file)!r}: {exc}") from exc
    _check_xy(x, y, file)
    return x, y


def _read_csv_split(file: Path) -> tuple[np.ndarray, np.ndarray]:
    if not file.exists():
        raise ConfigError(f"missing {file.name} in {str(file.parent)!r}")
    with file.open(encoding="utf-8") as handle:
        header = [h.strip() for h in handle.readline().strip().split(",")]
        if len(header) < 2 or header[-1] != "label":
            raise ConfigError(
                f"{str(file)!r}: the header must list the feature columns and end with "
                f"'label', got {header}"
            )
        try:
            table = np.loadtxt(handle, delimiter=",", ndmin=2, dtype=np.float64)
        except ValueError as exc:
            raise ConfigError(f"{str(file)!r}: not a numeric CSV table ({exc})") from exc
    if table.shape[1] != len(header):
        raise ConfigError(
            f"{str(file)!r}: header has {len(header)} columns but rows have {table.shape[1]}"
        )
    x, y = table[:, :-1], table[:, -1]
    _check_xy(x, y, file)
    return x, y


def _check_xy(x: np.ndarray, y: np.ndarray, file: Path) -> None:
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0] or y.size == 0:
        raise ConfigError(
            f"{str(file)!r}: need x with samples on axis 0 and 1-D y of the same length, "
            f"got x {x.shape} and y {y.shape}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise ConfigError(f"{str(file)!r}: x must be numeric, got dtype {x.dtype}")
    _check_labels(y, f"labels in {str(file)!r}")


# --------------------------------------------------------------------------- MNIST-1D


def default_cache_dir() -> Path:
    """``$FEDHIVE_CACHE`` if set, else ``~/.cache/fedhive``."""
    env = os.environ.get("FEDHIVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedhive"


def load_mnist1d(
    num_samples: int = 20000,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> Dataset:
    """MNIST-1D (Greydanus 2020, "Scaling down Deep Learning"), generated locally.

    Uses the ``mnist1d`` package's generator (``make_dataset`` with its default
    arguments, ``num_samples`` and ``seed`` replaced; never its downloader). The package
    splits 80/20 into train/test. ``num_samples`` is rounded down to a multiple of 10 (the
    generator makes the same number of samples per class). ``x`` has shape ``(n, 40)``.

    The generator seeds numpy's and Python's global RNGs; both states are saved before
    and restored after, so calling this has no effect on global randomness. The result
    is cached as ``.npz`` in ``cache_dir`` (default :func:`default_cache_dir`) under a
    name derived from the generator arguments.
    """
    n = check_int("num_samples", num_samples, 10)
    args = _mnist1d_args(n, check_int("seed", seed, 0))
    cache_file = _mnist1d_cache_file(args, cache_dir) if use_cache else None
    if cache_file is not None and cache_file.exists():
        arrays = _read_cache(cache_file)
    else:
        arrays = _generate_mnist1d(args)
        if cache_file is not None:
            _write_cache(cache_file, arrays)
    return Dataset(
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        num_classes=10,
        name="mnist1d",
    )


def _import_mnist1d_data() -> Any:
    try:
        import mnist1d.data
    except ImportError as exc:
        raise MissingDependency("mnist1d", "data") from exc
    return mnist1d.data


def _mnist1d_args(num_samples: int, seed: int) -> dict[str, Any]:
    """The package's default generator arguments with ours filled in (no download URL)."""
    args = dict(_import_mnist1d_data().get_dataset_args(as_dict=True))
    args.pop("url", None)
    args.update(num_samples=int(num_samples), seed=int(seed))
    return args


def _mnist1d_cache_file(args: dict[str, Any], cache_dir: str | os.PathLike[str] | None) -> Path:
    blob = json.dumps({"version": _CACHE_VERSION, **args}, sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"mnist1d_n{args['num_samples']}_s{args['seed']}_{digest}.npz"


@contextmanager
def _preserve_global_rng() -> Iterator[None]:
    """Restore numpy's and Python's global RNG states on exit."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _generate_mnist1d(args: dict[str, Any]) -> dict[str, np.ndarray]:
    data_mod = _import_mnist1d_data()
    view = data_mod.get_dataset_args()
    for key, value in args.items():
        setattr(view, key, value)
    with _preserve_global_rng():
        raw = data_mod.make_dataset(view)
    return {
        "x_train": np.asarray(raw["x"], dtype=np.float32),
        "y_train": np.asarray(raw["y"], dtype=np.int64),
        "x_test": np.asarray(raw["x_test"], dtype=np.float32),
        "y_test": np.asarray(raw["y_test"], dtype=np.int64),
    }


_CACHE_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_cache(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in _CACHE_KEYS}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"cached data set {str(file)!r} is unreadable ({exc}); delete it to regenerate"
        ) from exc


def _write_cache(file: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically so that readers (other runs sharing the cache) never see half a file."""
    with atomic_open(file) as handle:
        np.savez(
            handle,
            x_train=arrays["x_train"],
            y_train=arrays["y_train"],
            x_test=arrays["x_test"],
            y_test=arrays["y_test"],
        )


# --------------------------------------------------------------------------- digits


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 samples, 10 classes).

    ``x`` is scaled to ``[0, 1]`` with shape ``(n, 64)``; the train/test split is
    stratified by class and seeded.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise MissingDependency("scikit-learn", "data") from exc
    bunch = sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    train, test = _stratified_split(y, test_fraction, np.random.default_rng(seed))
    return Dataset(x[train], y[train], x[test], y[test], num_classes=10, name="digits")


def _stratified_split(
    y: LabelArray, test_fraction: float, rng: np.random.Generator
) -> tuple[LabelArray, LabelArray]:
    """Index arrays (train, test) holding ``test_fraction`` of every class in test."""
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


# --------------------------------------------------------------------------- synthetic


def synthetic(
    alpha: float,
    beta: float,
    num_devices: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """FedProx's Synthetic(alpha, beta) (Li et al. 2020, "Federated Optimization in
    Heterogeneous Networks").

    For each device ``k``: ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``;
    ``W_k ~ N(u_k, 1)`` (``num_classes x dim``), ``b_k ~ N(u_k, 1)``;
    ``v_k ~ N(B_k, 1)`` (``dim``); samples ``x ~ N(v_k, Sigma)`` with diagonal
    ``Sigma_jj = j^-1.2``; labels ``y = argmax(softmax(W_k x + b_k))``. ``alpha`` controls
    how much the local models differ, ``beta`` how much the local inputs differ; both are
    used as standard deviations, as in the authors' released generator. Device ``k`` has
    ``n_k = int(lognormal(4, 2)) + 50`` samples, split 80/20 into train/test.
    ``client_ids_train`` / ``client_ids_test`` give each sample's device.
    """
    alpha = check_float("alpha", alpha, positive=False)
    beta = check_float("beta", beta, positive=False)
    num_devices = check_int("num_devices", num_devices, 1)
    dim = check_int("dim", dim, 1)
    num_classes = check_int("num_classes", num_classes, 2)
    rng = np.random.default_rng(seed)
    sigma_sqrt = np.arange(1, dim + 1, dtype=np.float64) ** (-1.2 / 2)
    parts = [
        _synthetic_device(alpha, beta, num_classes, sigma_sqrt, rng) for _ in range(num_devices)
    ]
    return _assemble_devices(parts, num_classes, name=f"synthetic({alpha:g},{beta:g})")


def _synthetic_device(
    alpha: float,
    beta: float,
    num_classes: int,
    sigma_sqrt: npt.NDArray[np.float64],
    rng: np.random.Generator,
) -> tuple[FloatArray, LabelArray]:
    """Samples ``(x, y)`` of one device of Synthetic(alpha, beta)."""
    dim = len(sigma_sqrt)
    u_k = rng.normal(0.0, alpha)
    b_mean = rng.normal(0.0, beta)
    weights = rng.normal(u_k, 1.0, size=(num_classes, dim))
    bias = rng.normal(u_k, 1.0, size=num_classes)
    v_k = rng.normal(b_mean, 1.0, size=dim)
    n_k = int(rng.lognormal(4.0, 2.0)) + 50
    x = v_k + rng.standard_normal((n_k, dim)) * sigma_sqrt
    y = np.argmax(x @ weights.T + bias, axis=1)  # softmax is monotone: argmax of logits
    return x.astype(np.float32), y.astype(np.int64)


def _assemble_devices(
    parts: list[tuple[FloatArray, LabelArray]], num_classes: int, name: str
) -> Dataset:
    """Concatenate devices, the first 80% of each device's samples going to train."""
    xs_tr, ys_tr, ids_tr, xs_te, ys_te, ids_te = [], [], [], [], [], []
    for k, (x, y) in enumerate(parts):
        n_train = int(0.8 * len(y))
        xs_tr.append(x[:n_train])
        ys_tr.append(y[:n_train])
        ids_tr.append(np.full(n_train, k, dtype=np.int64))
        xs_te.append(x[n_train:])
        ys_te.append(y[n_train:])
        ids_te.append(np.full(len(y) - n_train, k, dtype=np.int64))
    return Dataset(
        x_train=np.concatenate(xs_tr),
        y_train=np.concatenate(ys_tr),
        x_test=np.concatenate(xs_te),
        y_test=np.concatenate(ys_te),
        num_classes=num_classes,
        name=name,
        client_ids_train=np.concatenate(ids_tr),
        client_ids_test=np.concatenate(ids_te),
    )


# --------------------------------------------------------------------------- registry

#: Loaders known to :func:`load_dataset`, by name.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist1d": load_mnist1d,
    "digits": load_digits,
    "synthetic": synthetic,
    "folder": load_folder,
}


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Load a built-in data set by name, passing ``kwargs`` to its loader.

    Raises:
        ConfigError: for an unknown name or arguments the loader does not take.
    """
    loader = DATASETS.get(name)
    if loader is None:
        raise ConfigError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    signature = inspect.signature(loader)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"bad arguments for data set {name!r}: {exc}; it takes {list(signature.parameters)}"
        ) from exc
    return loader(**kwargs)
