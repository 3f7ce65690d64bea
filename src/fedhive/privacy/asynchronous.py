"""Central differential privacy for buffered asynchronous aggregation (DP-FedBuff).

Each result's staleness-weighted delta against the model its client trained on is
clipped to ``clipping_norm`` ``C`` on the server; a published version is the sum of its
buffer's clipped deltas over the fixed ``buffer_size`` ``K``, plus Gaussian noise of
standard deviation ``noise_multiplier * C / K`` on every coordinate (once per published
version). The staleness weight is at most 1, so one result moves the mean by at most
``C / K``. The server moves by ``server_lr`` times that noisy mean, or hands it to
FedBuff's server optimizer (``server_momentum``, ``server_optimizer = "adam"``) as its
pseudo-gradient: the optimizer sees only released values, so it is post-processing and
costs no privacy (Dwork and Roth 2014, Proposition 2.1); its state is checkpointed.

What the accountant is told is the real participation of each version: asynchronous
clients are not sampled uniformly (who lands in a buffer depends on device speed), so
no sampling amplification is claimed (``sampling="none"``), and a client whose results
land in one buffer ``m`` times moves it by up to ``m C / K``: the version is recorded as
a release with noise multiplier ``noise_multiplier / m`` for the largest such ``m``.
Epsilon is user-level, at ``delta``, and every version's fit metrics carry it.

The noise comes from the operating system's secure generator (never replayed, also not
after a resume) unless ``noise_seed`` is given (tests only; the run is then not private).

Secure aggregation cannot be combined with an asynchronous strategy: it reveals only
the sum of a fixed cohort of masked updates, at once, while FedBuff needs each update
with its own staleness and base model (``docs/stragglers.md``).

Example::

    from fedhive.privacy.asynchronous import DifferentialPrivacyFedBuff
    from fedhive.server.strategy import FedBuff

    strategy = DifferentialPrivacyFedBuff(
        FedBuff(buffer_size=10, concurrency=20), noise_multiplier=1.0, clipping_norm=1.0
    )
"""

from __future__ import annotations

from typing import Any, final

import numpy as np

from fedhive.common.errors import ConfigError, InvalidUpdate
from fedhive.common.message import derive_seed
from fedhive.common.records import (
    FitRes,
    NDArrays,
    Parameters,
    RecordDict,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.privacy.accounting import PrivacyAccountant, Release
from fedhive.privacy.clipping import clip_update, model_update
from fedhive.privacy.noise import NoiseSource, SecureGaussian, SeededGaussian
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy.asyncbase import AsynchronousStrategy
from fedhive.server.strategy.base import Aggregator
from fedhive.server.strategy.composed import cast_like
from fedhive.server.strategy.fedbuff import FedBuff
from fedhive.server.strategy.traits import StrategyTraits

__all__ = ["DifferentialPrivacyFedBuff"]

_RECORD = "dp_fedbuff"


@final
class DifferentialPrivacyFedBuff(AsynchronousStrategy):
    """FedBuff with server-side clipping and noise per published version (module doc).

    Takes the buffer size, concurrency, staleness function, ``max_staleness``, server
    learning rate or optimizer and sampling of ``strategy``. Memory: one float64 model-sized sum per
    buffer plus the versions clients train on (as FedBuff).
    """

    def __init__(
        self,
        strategy: FedBuff,
        noise_multiplier: float,
        clipping_norm: float,
        *,
        delta: float = 1e-5,
        noise_seed: int | None = None,
    ) -> None:
        if not isinstance(strategy, FedBuff):
            raise ConfigError(
                f"DifferentialPrivacyFedBuff wraps a FedBuff, got {type(strategy).__name__}"
            )
        for name, value in (
            ("noise_multiplier", noise_multiplier),
            ("clipping_norm", clipping_norm),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if not clipping_norm > 0:
            raise ConfigError(f"clipping_norm must be > 0, got {clipping_norm!r}")
        super().__init__(
            sampling=strategy.sampling,
            buffer_size=strategy.buffer_size,
            concurrency=strategy.concurrency,
            staleness=strategy.staleness_fn,
            max_staleness=strategy.max_staleness,
        )
        self.server_lr = strategy.server_lr
        #: FedBuff's server optimizer (momentum or Adam), stepped with the noisy mean.
        self.optimizer = strategy.optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.delta = delta
        self.noise_seed = noise_seed
        self.accountant = PrivacyAccountant("none", "rdp")
        self.accountant.epsilon(delta)  # checks delta now, not at the first version

    @property
    def traits(self) -> StrategyTraits:
        return super().traits.but(weighting="uniform")

    def __repr__(self) -> str:
        return (
            f"DifferentialPrivacyFedBuff(buffer_size={self.buffer_size}, noise_multiplier="
            f"{self.noise_multiplier}, clipping_norm={self.clipping_norm})"
        )

    def noise_source(self, version: int) -> NoiseSource:
        if self.noise_seed is None:
            return SecureGaussian()
        return SeededGaussian(derive_seed(self.noise_seed, version, "", "dp-fedbuff"))

    def fit_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        return _DpBuffer(self, server_round, parameters_to_ndarrays(parameters))

    def state_dict(self) -> RecordDict:
        state = self.accountant.state_dict()
        state.config_records[_RECORD] = {"version": self.ledger.version}
        if self.optimizer is not None:
            moments = self.optimizer.state_dict()
            state.array_records.update(moments.array_records)
            state.config_records.update(moments.config_records)
        return state

    def load_state_dict(self, state: RecordDict) -> None:
        self.accountant.load_state_dict(state)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state)
        meta = state.config_records.get(_RECORD)
        if meta is not None:
            self.ledger.version = int(meta["version"])
        self.ledger.clear_in_flight()
        self._published = None


class _DpBuffer:
    def __init__(self, strategy: DifferentialPrivacyFedBuff, server_round: int, x: NDArrays):
        self.strategy = strategy
        self.server_round = server_round
        self.reference = x
        self.sum = [np.zeros(r.shape, np.float64) for r in x]
        self.counts: dict[str, int] = {}
        self.metrics: list[tuple[int, dict[str, Scalar]]] = []
        self.unclipped = 0

    def add(self, client: ClientProxy, result: FitRes) -> None:
        if not isinstance(result, FitRes):
            raise InvalidUpdate(client.cid, self.server_round, "fit", "reply is not a FitRes")
        _, weight, base = self.strategy.arrived(client, self.server_round)
        update = model_update(parameters_to_ndarrays(result.parameters), base)
        for arr in update:
            arr *= weight
        _, norm = clip_update(update, self.strategy.clipping_norm)
        for acc, arr in zip(self.sum, update, strict=True):
            acc += arr
        self.unclipped += int(norm <= self.strategy.clipping_norm)
        self.counts[client.cid] = self.counts.get(client.cid, 0) + 1
        self.metrics.append((result.num_examples, result.metrics))

    def add_failure(self, failure: BaseException) -> None:
        self.strategy.failed(failure)

    def finalize(self) -> tuple[Parameters | None, dict[str, Scalar]]:
        strategy = self.strategy
        if not self.counts:
            return None, {}
        k = strategy.buffer_size
        stddev = strategy.noise_multiplier * strategy.clipping_norm / k
        noise = strategy.noise_source(strategy.ledger.version + 1)
        means: list[Any] = []
        for acc in self.sum:
            mean = acc / k
            if stddev > 0:
                mean += stddev * noise.standard_normal(mean.shape)
            means.append(mean)
        new: list[Any]
        if strategy.optimizer is not None:  # post-processing of the released mean
            new = list(strategy.optimizer.step(self.reference, means))
        else:
            new = [
                np.asarray(x, np.float64) + strategy.server_lr * mean
                for x, mean in zip(self.reference, means, strict=True)
            ]
        most = max(self.counts.values())
        strategy.accountant.record(Release(strategy.noise_multiplier / most))
        params = strategy.published(ndarrays_to_parameters(cast_like(new, self.reference)))
        metrics = strategy.fit_metrics(self.metrics)
        metrics.update(
            {
                "epsilon": strategy.accountant.epsilon(strategy.delta),
                "delta": strategy.delta,
                "dp_rounds": strategy.accountant.rounds,
                "dp_participants": len(self.counts),
                "dp_max_contributions": most,
                "dp_noise_stddev": stddev,
                "dp_unclipped_fraction": self.unclipped / sum(self.counts.values()),
            }
        )
        if strategy.noise_seed is not None:
            metrics["dp_not_private"] = True
        return params, metrics
