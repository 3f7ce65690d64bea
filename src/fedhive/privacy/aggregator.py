"""The fit aggregator of the DP wrappers: clip (or check) each update, sum, add noise.

Memory: one float64 sum the size of the model plus the update being folded: O(model),
whatever the number of clients. With secure aggregation the sum arrives as one mean
(:meth:`DpAggregator.add_mean`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fedhive.common.errors import InvalidUpdate
from fedhive.common.records import (
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from fedhive.privacy.central import NORM_BIT_KEY
from fedhive.privacy.clipping import clip_update, l2_norm, model_update
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy.base import MeanClients, fold_mean
from fedhive.server.strategy.composed import cast_like

if TYPE_CHECKING:
    from fedhive.privacy.central import _DpStrategy

__all__ = ["DpAggregator"]


def _public(metrics: dict[str, Scalar]) -> dict[str, Scalar]:
    """A client's metrics without the norm bit, which only the DP aggregator reads."""
    return {k: v for k, v in metrics.items() if k != NORM_BIT_KEY}


class DpAggregator:
    """Clips (or checks) each update, folds it into a float64 sum; noise at the end."""

    def __init__(self, strategy: _DpStrategy, server_round: int, parameters: Parameters) -> None:
        self.strategy = strategy
        self.server_round = server_round
        self.parameters = parameters
        self.reference = parameters_to_ndarrays(parameters)
        self.clipping_norm = strategy.clipping_norm
        self.sum = [np.zeros(r.shape, np.float64) for r in self.reference]
        self.count = 0
        self.unclipped = 0
        self.clients: list[tuple[str, int, dict[str, Scalar]]] = []
        self.failures: list[Any] = []
        self.rounding = 0.0  # beta: what secure aggregation's rounding may add to a norm

    def _refuse(self, client: ClientProxy, reason: str) -> InvalidUpdate:
        return InvalidUpdate(client.cid, self.server_round, "fit", reason)

    def _client_clipped(self, client: ClientProxy, res: FitRes, update: NDArrays) -> bool:
        """Check a client-clipped update; return its norm bit."""
        new = parameters_to_ndarrays(res.parameters)
        slack = self.clipping_norm * 1e-9 + sum(
            float(np.finfo(a.dtype).eps) * l2_norm([a]) for a in new if a.dtype.kind == "f"
        )
        norm = l2_norm(update)
        if norm > self.clipping_norm + slack:
            raise self._refuse(
                client,
                f"update norm {norm:.6g} exceeds the clip norm {self.clipping_norm:.6g}: the "
                "client did not clip (add fixedclipping_mod or adaptiveclipping_mod to its "
                "ClientApp)",
            )
        return self._norm_bit(client.cid, res.metrics)

    def _norm_bit(self, cid: str, metrics: dict[str, Scalar]) -> bool:
        """The norm bit a client reports for adaptive clipping (True without it)."""
        if self.strategy.adaptive is None:
            return True
        bit = metrics.get(NORM_BIT_KEY)
        if isinstance(bit, bool) or bit not in (0, 1):
            raise InvalidUpdate(
                cid,
                self.server_round,
                "fit",
                f"metrics[{NORM_BIT_KEY!r}] must be 0 or 1, got {bit!r}: adaptive client-side "
                "clipping needs adaptiveclipping_mod on every client",
            )
        return bool(bit)

    def add(self, client: ClientProxy, result: FitRes) -> None:
        if not isinstance(result, FitRes):
            raise self._refuse(client, "reply is not a FitRes")
        update = model_update(parameters_to_ndarrays(result.parameters), self.reference)
        if self.strategy.clip_on_client:
            unclipped = self._client_clipped(client, result, update)
            clip_update(update, self.clipping_norm)  # rounding only; the check passed
        else:
            _, norm = clip_update(update, self.clipping_norm)
            unclipped = norm <= self.clipping_norm
        for acc, arr in zip(self.sum, update, strict=True):
            acc += arr
        self.count += 1
        self.unclipped += int(unclipped)
        self.clients.append((client.cid, result.num_examples, _public(result.metrics)))

    def add_mean(self, mean: NDArrays, clients: MeanClients) -> None:
        """Fold the mean of ``len(clients)`` clipped updates that secure aggregation
        revealed (weight 1 each), instead of each update.

        The server cannot check each client's norm here; the clients' clipping mods
        (inside the secure aggregation mod, which only client-side clipping wrappers are
        allowed with) clip before masking. With adaptive clipping each client still
        reports its norm bit in the clear, as without secure aggregation.
        """
        update = model_update(mean, self.reference)
        for acc, arr in zip(self.sum, update, strict=True):
            acc += arr * len(clients)
        self.count += len(clients)
        for cid, num_examples, metrics in clients:
            self.unclipped += int(self._norm_bit(cid, metrics))
            self.clients.append((cid, num_examples, _public(metrics)))

    def add_failure(self, failure: BaseException) -> None:
        self.failures.append(failure)

    def account_rounding(self, beta: float) -> None:
        """Secure aggregation released rounded updates of norm at most C + ``beta``
        (conditional rounding): the noise is scaled to that sensitivity, so the
        accountant's noise multiplier holds for what was released."""
        self.rounding = max(self.rounding, float(beta))

    def finalize(self) -> tuple[Parameters | None, dict[str, Scalar]]:
        strategy = self.strategy
        if self.count == 0:
            return None, {}
        m = strategy.num_sampled_clients
        z_update, count_stddev = strategy.noise_split()
        sensitivity = self.clipping_norm + self.rounding
        stddev = z_update * sensitivity / m
        noise = strategy.noise_source(self.server_round)
        released = []
        for acc, ref in zip(self.sum, self.reference, strict=True):
            acc /= m
            if stddev > 0:
                acc += stddev * noise.standard_normal(acc.shape)
            acc += ref
            released.append(acc)
        metrics = strategy.privacy_metrics()
        metrics["dp_clipping_norm"] = self.clipping_norm
        metrics["dp_noise_stddev"] = stddev
        metrics["dp_sensitivity"] = sensitivity
        if strategy.adaptive is not None:
            centred = self.unclipped - self.count / 2.0
            if count_stddev > 0:
                centred += count_stddev * float(noise.standard_normal((1,))[0])
            unclipped_fraction = centred / m + 0.5
            strategy._adapt(unclipped_fraction)
            metrics["dp_unclipped_fraction"] = unclipped_fraction
            metrics["dp_next_clipping_norm"] = strategy.clipping_norm
        params, inner_metrics = self._inner_step(cast_like(released, self.reference))
        return params, {**inner_metrics, **metrics}

    def _inner_step(self, released: NDArrays) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Hand the noisy mean to the inner strategy (post-processing).

        The noisy mean reaches the inner aggregator as every client's model, with each
        client's own ``num_examples`` and metrics (:func:`fold_mean`: folded once by a
        mean-based strategy), so it gets the noisy mean back and its metrics aggregation
        sees the real clients.
        """
        aggregator = self.strategy.strategy.fit_aggregator(self.server_round, self.parameters)
        for failure in self.failures:
            aggregator.add_failure(failure)
        fold_mean(aggregator, released, self.clients)
        params, metrics = aggregator.finalize()
        return params, dict(metrics)
