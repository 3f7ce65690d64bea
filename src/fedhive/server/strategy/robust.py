"""Byzantine-robust aggregation rules: they need every update at once.

Each rule buffers the round's models and reduces them at the end, so memory is
O(clients x model) for the buffer, plus O(clients x largest layer) float64 scratch while
one layer is reduced; Krum and Bulyan also keep a clients x clients distance matrix and
take O(clients^2 x model) time to fill it. Updates are unweighted: a Byzantine client
could otherwise claim a huge ``num_examples``.

Before reducing, the buffer is sorted by client id (string order), so every rule gives the
same result for any arrival order, and ties (equal Krum scores) go to the smallest id.

The rules reduce models, not differences to the global model; the two are equivalent for
all of them (a common shift commutes with medians, trimmed means and distances).

Their traits say so: each needs individual updates and none is a weighted mean (one client
can move a median or a selection by more than ``C / m``), so secure aggregation and
differential privacy refuse them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedhive.common.errors import ConfigError
from fedhive.common.records import FitRes, NDArray, NDArrays
from fedhive.server.strategy.composed import Fold
from fedhive.server.strategy.traits import StrategyTraits

__all__ = [
    "BulyanRule",
    "KrumRule",
    "MedianRule",
    "TrimmedMeanRule",
    "check_count",
    "krum_select",
    "pairwise_sq_distances",
]

#: ``(client ids, models, weights) -> aggregate``; the weights are the clients'
#: ``num_examples`` (capped as the strategy caps them), for rules that weigh.
Reduce = Callable[[list[str], list[NDArrays], list[float]], NDArrays]

log = logging.getLogger("fedhive")


def check_count(name: str, value: int, minimum: int = 0) -> int:
    """``value``, or :class:`ConfigError` unless it is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class _BufferFold:
    """Keeps (client id, model, weight); reduces them, sorted by client id, at the end."""

    def __init__(self, reduce: Reduce, weight: Callable[[int], float] = float) -> None:
        self.reduce = reduce
        self.weight = weight
        self.updates: list[tuple[str, NDArrays, float]] = []

    def add(self, client_id: str, arrays: NDArrays, result: FitRes) -> None:
        self.updates.append((client_id, arrays, float(self.weight(result.num_examples))))

    def result(self) -> NDArrays | None:
        if not self.updates:
            return None
        ordered = sorted(self.updates, key=lambda entry: entry[0])
        return self.reduce(
            [cid for cid, _, _ in ordered], [a for _, a, _ in ordered], [w for _, _, w in ordered]
        )


def _layer(updates: Sequence[NDArrays], index: int) -> NDArray:
    """Layer ``index`` of every update, stacked as a float64 (clients, size) matrix."""
    return np.stack([np.ravel(u[index]) for u in updates]).astype(np.float64, copy=False)


def _layerwise(updates: Sequence[NDArrays], reduce: Callable[[NDArray], NDArray]) -> NDArrays:
    """Apply ``reduce`` (clients, size) -> (size,) to each layer; reshape back."""
    first = updates[0]
    return [reduce(_layer(updates, i)).reshape(first[i].shape) for i in range(len(first))]


def _mean_of(updates: Sequence[NDArrays]) -> NDArrays:
    return _layerwise(updates, lambda stack: stack.mean(axis=0))


class MedianRule:
    """Coordinate-wise median (Yin et al. 2018); the mean of the middle two for even n."""

    traits = StrategyTraits(reason="its aggregate is a coordinate-wise median")

    def __repr__(self) -> str:
        return "MedianRule()"

    def start(self, server_round: int, reference: NDArrays, weight: Callable[[int], float]) -> Fold:
        return _BufferFold(lambda cids, ups, ws: _layerwise(ups, lambda s: np.median(s, axis=0)))


class TrimmedMeanRule:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    For each coordinate the ``int(beta * n)`` largest and as many smallest values are
    dropped and the rest averaged. ``0 <= beta < 0.5``.
    """

    traits = StrategyTraits(reason="its aggregate is a coordinate-wise trimmed mean")

    def __init__(self, beta: float) -> None:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 0.5:
            raise ConfigError(
                f"beta (the fraction trimmed at each end) must be in [0, 0.5), got {beta!r}"
            )
        self.beta = float(beta)

    def __repr__(self) -> str:
        return f"TrimmedMeanRule(beta={self.beta})"

    def start(self, server_round: int, reference: NDArrays, weight: Callable[[int], float]) -> Fold:
        return _BufferFold(lambda cids, ups, ws: _layerwise(ups, self._trimmed))

    def _trimmed(self, stack: NDArray) -> NDArray:
        n = stack.shape[0]
        cut = int(self.beta * n)
        ordered = np.sort(stack, axis=0)
        return ordered[cut : n - cut].mean(axis=0)


def pairwise_sq_distances(updates: Sequence[NDArrays]) -> NDArray:
    """Squared Euclidean distances between whole models, (n, n), float64, symmetric."""
    n = len(updates)
    dist = np.zeros((n, n))
    # A huge (finite) Byzantine update may overflow to inf: that only means "far away".
    with np.errstate(over="ignore", invalid="ignore"):
        for index in range(len(updates[0]) if updates else 0):
            stack = _layer(updates, index)
            for i in range(n - 1):
                diff = stack[i + 1 :] - stack[i]
                d = np.einsum("ij,ij->i", diff, diff)
                dist[i, i + 1 :] += d
                dist[i + 1 :, i] += d
    return dist


def _scores(dist: NDArray, members: Sequence[int], f: int) -> dict[int, float]:
    """Krum scores: sum of squared distances to the ``len(members) - f - 2`` nearest.

    At least one neighbour counts (Bulyan's last selections run Krum on fewer than
    2f + 3 models); a single member scores 0.
    """
    k = min(max(len(members) - f - 2, 1), len(members) - 1)
    out = {}
    for i in members:
        others = np.sort([dist[i, j] for j in members if j != i])
        out[i] = float(others[:k].sum())
    return out


def krum_select(dist: NDArray, cids: Sequence[str], members: Sequence[int], f: int) -> list[int]:
    """``members`` ordered by Krum score, ties broken by client id (best first)."""
    scores = _scores(dist, members, f)
    return sorted(members, key=lambda i: (scores[i], cids[i]))


def _check_krum_size(rule: str, n: int, f: int, minimum: int) -> None:
    if n < minimum:
        raise ConfigError(
            f"{rule} with num_malicious_clients={f} needs at least {minimum} results in a "
            f"round, got {n}; sample more clients (raise min_fit_clients and "
            "min_available_clients) or lower num_malicious_clients"
        )


class KrumRule:
    """Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017).

    Each model's score is the sum of squared distances to its ``n - f - 2`` nearest
    neighbours. The paper assumes ``n >= 2f + 3``; with fewer results the rule still
    runs on ``max(1, n - f - 2)`` neighbours, as Flower does, and logs a warning. Krum
    returns the best-scoring model; Multi-Krum averages the ``m`` best, weighted by
    ``num_examples`` as in Flower (``weighted=False``: the unweighted mean, which a
    Byzantine client cannot sway by claiming a large count). ``num_clients_to_keep`` is
    ``m``; 0 means 1 (Krum) unless ``multi=True``, where 0 means ``n - f``.
    """

    traits = StrategyTraits(reason="its aggregate selects the models with the best Krum scores")

    def __init__(
        self,
        num_malicious_clients: int = 0,
        num_clients_to_keep: int = 0,
        *,
        multi: bool = False,
        weighted: bool = True,
    ) -> None:
        self.f = check_count("num_malicious_clients", num_malicious_clients)
        self.m = check_count("num_clients_to_keep", num_clients_to_keep)
        self.multi = multi
        self.weighted = bool(weighted)

    def __repr__(self) -> str:
        name = "Multi-Krum" if self.multi else "Krum"
        return f"KrumRule({name}, num_malicious_clients={self.f}, num_clients_to_keep={self.m})"

    def min_results(self) -> int:
        return max(2 * self.f + 3, self.m)

    def start(self, server_round: int, reference: NDArrays, weight: Callable[[int], float]) -> Fold:
        return _BufferFold(self._reduce, weight)

    def _reduce(self, cids: list[str], updates: list[NDArrays], weights: list[float]) -> NDArrays:
        n = len(updates)
        if n < 2 * self.f + 3:
            log.warning(
                "Krum with num_malicious_clients=%d assumes at least %d results, got %d: "
                "scoring on %d nearest neighbours instead (as Flower does)",
                self.f,
                2 * self.f + 3,
                n,
                max(1, n - self.f - 2),
            )
        m = self.m or (n - self.f if self.multi else 1)
        if m > n:
            raise ConfigError(f"num_clients_to_keep={m} but only {n} results arrived")
        best = sorted(krum_select(pairwise_sq_distances(updates), cids, range(n), self.f)[:m])
        if len(best) == 1 or not self.weighted:
            return _mean_of([updates[i] for i in best])
        return _weighted_mean_of([updates[i] for i in best], [weights[i] for i in best])


def _weighted_mean_of(updates: Sequence[NDArrays], weights: Sequence[float]) -> NDArrays:
    """The mean of ``updates`` weighted by ``weights`` (the unweighted mean if they sum to 0)."""
    w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if not total > 0:
        return _mean_of(updates)
    return _layerwise(updates, lambda stack: (w @ stack) / total)


class BulyanRule:
    """Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018); needs ``n >= 4f + 3``.

    1. Select ``theta = n - 2f`` models one at a time: run Krum on those not yet selected
       and take the best (with ``to_keep > 0``: average the ``to_keep`` best, Multi-Krum,
       and take the remaining model nearest to that average).
    2. For each coordinate, average the ``beta = theta - 2f`` selected values nearest to
       their median.
    """

    traits = StrategyTraits(
        reason="its aggregate is a Krum selection followed by a trimmed mean around the median"
    )

    def __init__(
        self,
        num_malicious_clients: int = 0,
        to_keep: int = 0,
        first_rule: Callable[..., NDArrays] | None = None,
        rule_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.f = check_count("num_malicious_clients", num_malicious_clients)
        self.to_keep = check_count("to_keep", to_keep)
        self.first_rule = first_rule
        self.rule_kwargs = dict(rule_kwargs or {})

    def __repr__(self) -> str:
        first = "" if self.first_rule is None else f", first_rule={self.first_rule!r}"
        return f"BulyanRule(num_malicious_clients={self.f}, to_keep={self.to_keep}{first})"

    def min_results(self) -> int:
        return 4 * self.f + 3

    def start(self, server_round: int, reference: NDArrays, weight: Callable[[int], float]) -> Fold:
        return _BufferFold(self._reduce)

    def _reduce(self, cids: list[str], updates: list[NDArrays], weights: list[float]) -> NDArrays:
        n = len(updates)
        _check_krum_size("Bulyan", n, self.f, 4 * self.f + 3)
        chosen = self._select(cids, updates, n - 2 * self.f)
        beta = len(chosen) - 2 * self.f
        return _layerwise([updates[i] for i in chosen], lambda s: _nearest_to_median(s, beta))

    def _select(self, cids: list[str], updates: list[NDArrays], theta: int) -> list[int]:
        first_rule = self.first_rule

        def by_first_rule(remaining: list[int]) -> int:
            results = [(updates[i], 1) for i in remaining]
            target = first_rule(results, num_malicious_clients=self.f, **self.rule_kwargs)  # type: ignore[misc]
            return _nearest(target, remaining, updates, cids)

        def by_krum(remaining: list[int]) -> int:
            ranked = krum_select(dist, cids, remaining, self.f)
            if not self.to_keep:
                return ranked[0]
            centre = _mean_of([updates[i] for i in sorted(ranked[: self.to_keep])])
            return _nearest(centre, remaining, updates, cids)

        # the user's first rule needs no distances; Krum's are computed once
        dist = pairwise_sq_distances(updates) if first_rule is None else np.empty((0, 0))
        pick = by_krum if first_rule is None else by_first_rule
        remaining = list(range(len(updates)))
        chosen: list[int] = []
        while len(chosen) < theta:
            chosen.append(pick(remaining))
            remaining.remove(chosen[-1])
        return sorted(chosen)


def _nearest(target: NDArrays, among: list[int], updates: list[NDArrays], cids: list[str]) -> int:
    """The index in ``among`` of the update nearest to ``target`` (ties: smaller client id)."""
    return min(among, key=lambda i: (_sq_distance(updates[i], target), cids[i]))


def _sq_distance(a: NDArrays, b: NDArrays) -> float:
    return float(
        sum(np.sum((np.asarray(x, np.float64) - y) ** 2) for x, y in zip(a, b, strict=True))
    )


def _nearest_to_median(stack: NDArray, beta: int) -> NDArray:
    """Per column: the mean of the ``beta`` values nearest to the column's median."""
    ordered = np.sort(stack, axis=0)
    median = np.median(ordered, axis=0)
    nearest = np.argsort(np.abs(ordered - median), axis=0, kind="stable")[:beta]
    return np.take_along_axis(ordered, nearest, axis=0).mean(axis=0)
