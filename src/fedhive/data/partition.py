"""Split a data set's sample indices among simulated clients (IID and non-IID).

Every partitioner returns a :class:`Partition`: one ``int64`` index array per client. The
index arrays are disjoint, sorted, and together cover every sample exactly once (nothing
is dropped). Randomness comes only from ``np.random.default_rng(seed)``, so the same
arguments always give the same partition.

Partitioners:

- :func:`iid`: a uniform random split into (almost) equal parts.
- :func:`dirichlet`: label skew; per class, proportions drawn from Dirichlet(alpha)
  (Hsu et al. 2019; Yurochkin et al. 2019).
- :func:`shards`: the "pathological non-IID" split of McMahan et al. 2017.
- :func:`quantity_skew`: IID labels, log-normal client sizes.
- :func:`natural`: one client per user-given group id (writer, device, hospital, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedhive.common.errors import ConfigError
from fedhive.data._validate import check_float, check_int

__all__ = [
    "ClientSplit",
    "Partition",
    "client_splits",
    "dirichlet",
    "format_partition_table",
    "iid",
    "natural",
    "quantity_skew",
    "shards",
]

IndexArray = npt.NDArray[np.int64]

#: How many times :func:`dirichlet` redraws before giving up on ``min_size``.
DIRICHLET_MAX_TRIES = 1000


@dataclass(frozen=True, eq=False)
class Partition:
    """Sample indices per client: ``indices[k]`` are the samples of client ``k``."""

    indices: list[IndexArray]

    @property
    def num_clients(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> npt.NDArray[np.int64]:
        """Number of samples of each client, shape ``(num_clients,)``."""
        return np.array([len(ix) for ix in self.indices], dtype=np.int64)

    def label_histograms(self, labels: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.int64]:
        """Per-client label counts, shape ``(num_clients, num_classes)``."""
        y = _as_labels(labels)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if y.size and int(y.max()) >= num_classes:
            raise ConfigError(f"labels go up to {int(y.max())} but num_classes is {num_classes}")
        hist = np.zeros((self.num_clients, num_classes), dtype=np.int64)
        for k, ix in enumerate(self.indices):
            hist[k] = np.bincount(y[ix], minlength=num_classes)
        return hist


# --------------------------------------------------------------------------- checks


def _as_labels(labels: npt.ArrayLike) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ConfigError(f"labels must be a 1-D array, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.size and int(y.min()) < 0:
        raise ConfigError(f"labels must be >= 0, got {int(y.min())}")
    return y


def _check_clients(num_clients: int, n_samples: int) -> int:
    check_int("num_clients", num_clients, 1)
    if num_clients > n_samples:
        raise ConfigError(
            f"num_clients ({num_clients}) is larger than the number of samples ({n_samples})"
        )
    return int(num_clients)


def _split_by_counts(order: IndexArray, counts: npt.NDArray[np.int64]) -> list[IndexArray]:
    """Cut ``order`` into consecutive pieces of the given sizes, each sorted."""
    pieces = np.split(order, np.cumsum(counts)[:-1])
    return [np.sort(p).astype(np.int64) for p in pieces]


# --------------------------------------------------------------------------- partitioners


def iid(n_samples: int, num_clients: int, seed: int) -> Partition:
    """Shuffle all samples and deal them into ``num_clients`` parts of (almost) equal size."""
    n = check_int("n_samples", n_samples, 1)
    k = _check_clients(num_clients, n)
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return Partition([np.sort(p) for p in np.array_split(order, k)])


def dirichlet(
    labels: npt.ArrayLike,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> Partition:
    """Label-skewed split: each class is shared out by Dirichlet(alpha) proportions.

    For every class ``c`` a vector ``p_c ~ Dir(alpha, ..., alpha)`` over the clients is
    drawn and the (shuffled) samples of class ``c`` are cut in those proportions. Small
    ``alpha`` gives each client few dominant labels; large ``alpha`` approaches IID. The
    whole draw is repeated until every client holds at least ``min_size`` samples
    (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification"; Yurochkin et al. 2019, "Bayesian Nonparametric
    Federated Learning of Neural Networks").

    Raises:
        ConfigError: on bad arguments, or when no draw within ``DIRICHLET_MAX_TRIES``
            gives every client ``min_size`` samples.
    """
    y = _as_labels(labels)
    k = _check_clients(num_clients, len(y))
    check_float("alpha", alpha, positive=True)
    min_size = check_int("min_size", min_size, 0)
    if min_size * k > len(y):
        raise ConfigError(
            f"min_size={min_size} for {k} clients needs {min_size * k} samples, "
            f"but there are only {len(y)}"
        )
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_MAX_TRIES):
        parts = _dirichlet_draw(y, k, float(alpha), rng)
        if min(len(p) for p in parts) >= min_size:
            return Partition([np.sort(p).astype(np.int64) for p in parts])
    raise ConfigError(
        f"dirichlet partition: no draw in {DIRICHLET_MAX_TRIES} tries gave all {k} clients "
        f"at least min_size={min_size} samples (alpha={alpha}, {len(y)} samples); "
        "use a larger alpha, a smaller min_size or fewer clients"
    )


def _dirichlet_draw(
    y: npt.NDArray[np.int64], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[IndexArray]:
    """One draw of the Dirichlet split (no size check)."""
    buckets: list[list[IndexArray]] = [[] for _ in range(num_clients)]
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for k, piece in enumerate(np.split(members, cuts)):
            buckets[k].append(piece)
    return [np.concatenate(b) if b else np.empty(0, dtype=np.int64) for b in buckets]


def shards(
    labels: npt.ArrayLike, num_clients: int, shards_per_client: int = 2, *, seed: int
) -> Partition:
    """Pathological non-IID split of McMahan et al. 2017.

    Samples are sorted by label (ties in random order), cut into
    ``num_clients * shards_per_client`` consecutive shards of (almost) equal size, and
    each client receives ``shards_per_client`` shards chosen at random. When every class
    size is a multiple of the shard size, each client sees at most ``shards_per_client``
    labels (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data").
    """
    y = _as_labels(labels)
    spc = check_int("shards_per_client", shards_per_client, 1)
    k = _check_clients(num_clients, len(y))
    num_shards = k * spc
    if num_shards > len(y):
        raise ConfigError(
            f"{k} clients x {spc} shards_per_client = {num_shards} shards, "
            f"but there are only {len(y)} samples"
        )
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(y))
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")].astype(np.int64)
    pieces = np.array_split(by_label, num_shards)
    owner = rng.permutation(num_shards).reshape(k, spc)
    return Partition([np.sort(np.concatenate([pieces[s] for s in row])) for row in owner])


def quantity_skew(
    n_samples: int, num_clients: int, seed: int, sigma: float = 1.0, min_size: int = 1
) -> Partition:
    """IID labels, unequal sizes: client shares drawn from a log-normal(0, sigma).

    Every client first gets ``min_size`` samples; the rest are shared out by a multinomial
    draw with probabilities proportional to log-normal weights, then the shuffled samples
    are dealt in those sizes. ``sigma = 0`` gives (almost) equal sizes.
    """
    n = check_int("n_samples", n_samples, 1)
    k = _check_clients(num_clients, n)
    min_size = check_int("min_size", min_size, 0)
    check_float("sigma", sigma, positive=False)
    if min_size * k > n:
        raise ConfigError(
            f"min_size={min_size} for {k} clients needs {min_size * k} samples, "
            f"but there are only {n}"
        )
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(mean=0.0, sigma=float(sigma), size=k)
    extra = rng.multinomial(n - min_size * k, weights / weights.sum())
    counts = (extra + min_size).astype(np.int64)
    return Partition(_split_by_counts(rng.permutation(n).astype(np.int64), counts))


def natural(groups: npt.ArrayLike) -> Partition:
    """One client per distinct group id, clients in sorted group order.

    ``groups[i]`` names the owner of sample ``i`` (a writer, a device, a hospital); client
    ``k`` holds the samples of ``np.unique(groups)[k]``.
    """
    g = np.asarray(groups)
    if g.ndim != 1 or g.size == 0:
        raise ConfigError(f"groups must be a non-empty 1-D array, got shape {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    counts = np.bincount(inverse).astype(np.int64)
    return Partition(_split_by_counts(order, counts))


# --------------------------------------------------------------------------- per-client splits


@dataclass(frozen=True, eq=False)
class ClientSplit:
    """One client's samples cut into ``train``, ``val`` (model or round selection) and
    ``test`` (reported figures) index arrays, each sorted."""

    train: IndexArray
    val: IndexArray
    test: IndexArray


def client_splits(
    partition: Partition, *, val_fraction: float, test_fraction: float, seed: int
) -> list[ClientSplit]:
    """Each client's samples cut into train, validation and test parts, seeded.

    A client keeps ``round(n * test_fraction)`` samples for its own test split (at
    least one when ``test_fraction > 0``) and ``round(n * val_fraction)`` for
    validation; the rest is for training. Personalized FL reports each client's model
    on its own test split and selects rounds on the validation split.
    """
    check_float("val_fraction", val_fraction, positive=False)
    check_float("test_fraction", test_fraction, positive=False)
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"val_fraction ({val_fraction}) + test_fraction ({test_fraction}) must be < 1"
        )
    rng = np.random.default_rng(seed)
    out = []
    for k, idx in enumerate(partition.indices):
        shuffled = rng.permutation(idx)
        n_test = max(1, round(len(idx) * test_fraction)) if test_fraction > 0 else 0
        n_val = round(len(idx) * val_fraction)
        if n_test + n_val >= len(idx):
            raise ConfigError(
                f"client {k} has {len(idx)} samples: too few for a test split of {n_test}, "
                f"a validation split of {n_val} and any training data"
            )
        test, val = shuffled[:n_test], shuffled[n_test : n_test + n_val]
        train = shuffled[n_test + n_val :]
        out.append(ClientSplit(np.sort(train), np.sort(val), np.sort(test)))
    return out


# --------------------------------------------------------------------------- report


def format_partition_table(
    partition: Partition, labels: npt.ArrayLike, num_classes: int, *, max_rows: int = 0
) -> str:
    """Plain-text table of each client's size and label histogram.

    One row per client (``max_rows > 0`` keeps the first ``max_rows`` rows), then a
    summary line with the total and the min / median / max client size.
    """
    hist = partition.label_histograms(labels, num_classes)
    sizes = partition.sizes
    header = ["client", "size", "labels"] + [str(c) for c in range(num_classes)]
    rows = [
        [str(k), str(sizes[k]), str(int((hist[k] > 0).sum()))] + [str(v) for v in hist[k]]
        for k in range(partition.num_clients)
    ]
    shown = rows[:max_rows] if max_rows > 0 else rows
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [_format_row(header, widths), _format_row(["-" * w for w in widths], widths)]
    lines += [_format_row(r, widths) for r in shown]
    if len(shown) < len(rows):
        lines.append(f"... ({len(rows) - len(shown)} more clients)")
    lines.append(
        f"{partition.num_clients} clients, {int(sizes.sum())} samples; size "
        f"min {int(sizes.min())} / median {float(np.median(sizes)):g} / max {int(sizes.max())}"
    )
    return "\n".join(lines)


def _format_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
