"""FedBuff: buffered asynchronous aggregation of staleness-weighted deltas.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba. "Federated Learning with Buffered
Asynchronous Aggregation." AISTATS 2022.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Unpack, final

import numpy as np

from fedhive.common.errors import CheckpointError, ConfigError, InvalidUpdate
from fedhive.common.records import (
    FitRes,
    NDArray,
    NDArrays,
    Parameters,
    RecordDict,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy.asyncbase import AsynchronousStrategy
from fedhive.server.strategy.base import Aggregator
from fedhive.server.strategy.composed import FedAvgArgs, cast_like
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.optimizers import (
    Adaptive,
    ServerOptimizer,
    ServerSGD,
    check_positive,
)
from fedhive.server.strategy.staleness import StalenessFunction

__all__ = ["FedBuff"]

_BUFFER = "fedbuff.buffer"


@final
class FedBuff(AsynchronousStrategy):
    """FedBuff (Nguyen et al. 2022): a model version every ``buffer_size`` results.

    Each result ``y_i`` of a client that trained on version ``b_i`` is the delta
    ``y_i - x_{b_i}``, weighted by its example count ``n_i`` and the staleness function
    ``s(tau_i)`` (``staleness``: ``"poly"`` ``(1 + tau)^-a`` by default with
    ``staleness_exponent`` ``a = 0.5``; ``"constant"``; ``"hinge"``). After ``buffer_size``
    results the model moves by the buffered pseudo-gradient
    ``g = sum_i n_i s(tau_i) (y_i - x_{b_i}) / sum_i n_i``: ``x <- x + server_lr * g``
    (with ``server_momentum``, heavy-ball momentum on ``g``; with ``server_optimizer``
    ``"adam"``, FedAdam's server step of Reddi et al. 2021 with ``eta = server_lr``).
    Stale results are not renormalised: a stale buffer moves the model less, as dividing
    the paper's staleness-scaled sum by ``K`` does.

    ``concurrency`` clients train at once (its default policy); ``max_staleness`` refuses
    results more than that many versions old. With ``buffer_size == concurrency``, equal
    client latencies, ``staleness="constant"`` and ``server_lr=1`` every result is fresh
    and FedBuff is FedAvg, bit for bit (tested).

    Memory: three float64 model-sized accumulators while a buffer fills (the weighted
    sum of the models, the staleness correction ``sum n s (x - x_b)`` of a restored
    buffer, scratch) plus one model per older version a client is still training on (at
    most ``concurrency``) or that a result in the open buffer trained on: the correction
    is kept as one weight per base model and expanded when the version is published.
    The open buffer is part of :meth:`state_dict`, so a checkpoint taken mid-buffer
    resumes with it.

    Example::

        strategy = FedBuff(buffer_size=10, concurrency=20, server_lr=1.0)
        start_simulation(client_fn=..., num_clients=100, strategy=strategy,
                         config=ServerConfig(num_rounds=50))  # 50 versions, asynchronous
    """

    checkpoints_open_buffer = True

    def __init__(
        self,
        *,
        buffer_size: int = 10,
        concurrency: int = 20,
        staleness: Literal["constant", "poly", "hinge"] = "poly",
        staleness_exponent: float = 0.5,
        staleness_hinge: int = 4,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_optimizer: Literal["sgd", "adam"] | ServerOptimizer = "sgd",
        max_staleness: int | None = None,
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        self.server_lr = check_positive("server_lr", server_lr)
        self.optimizer: ServerOptimizer | None
        if server_optimizer == "sgd":
            sgd = ServerSGD(self.server_lr, server_momentum)
            self.server_momentum = sgd.momentum
            self.optimizer = sgd if sgd.momentum > 0 else None
        elif server_optimizer == "adam":
            self.server_momentum = 0.0
            self.optimizer = Adaptive("adam", eta=self.server_lr, beta_1=0.9, beta_2=0.99, tau=1e-3)
        elif isinstance(server_optimizer, str):
            raise ConfigError(
                f"server_optimizer must be 'sgd', 'adam' or a ServerOptimizer, got "
                f"{server_optimizer!r}"
            )
        else:
            self.server_momentum = 0.0
            self.optimizer = server_optimizer
        super().__init__(
            sampling=FedAvg(**fedavg),
            buffer_size=buffer_size,
            concurrency=concurrency,
            staleness=StalenessFunction(staleness, staleness_exponent, staleness_hinge),
            max_staleness=max_staleness,
        )
        self._open: _Buffer | None = None
        self._restored: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"FedBuff(buffer_size={self.buffer_size}, concurrency={self.concurrency}, "
            f"staleness={self.staleness!r}, server_lr={self.server_lr})"
        )

    def fit_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        buffer = _Buffer(self, server_round, parameters_to_ndarrays(parameters))
        restored, self._restored = self._restored, None
        if restored is not None:
            buffer.load(restored)
        self._open = buffer
        return buffer

    def update(
        self, x: NDArrays, a: list[NDArray], c: list[NDArray], s: float, n: float
    ) -> NDArrays:
        """The next model from the buffer's sums (see the class docstring).

        Without an optimizer: ``(1 - lr S/N) x + lr (A + C) / N``, which is the weighted
        mean ``A / N`` exactly when ``lr S / N == 1`` (every result fresh, ``s = 1``,
        ``lr = 1``).
        """
        if self.optimizer is None:
            keep = 1.0 - self.server_lr * s / n
            scale = n / self.server_lr
            out = []
            for xi, ai, ci in zip(x, a, c, strict=True):
                moved = (ai + ci) / scale
                if keep != 0.0:
                    moved = moved + keep * np.asarray(xi, dtype=np.float64)
                out.append(moved)
            return cast_like(out, x)
        grad = [
            (ai + ci) / n - (s / n) * np.asarray(xi, dtype=np.float64)
            for xi, ai, ci in zip(x, a, c, strict=True)
        ]
        return cast_like(self.optimizer.step(x, grad), x)

    def state_dict(self) -> RecordDict:
        state = self.optimizer.state_dict() if self.optimizer is not None else RecordDict()
        state.config_records["fedbuff"] = {"version": self.ledger.version}
        if self._open is not None and self._open.count > 0 and not self._open.finalized:
            self._open.dump(state)
        return state

    def load_state_dict(self, state: RecordDict) -> None:
        self.ledger.restore(state.config_records.get("fedbuff"), "FedBuff")
        self._published = None
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state)
        self._restored = _Buffer.read(state)


class _Buffer:
    """One model version's buffer: O(model) float64 sums, folded as results arrive."""

    def __init__(self, strategy: FedBuff, server_round: int, reference: NDArrays) -> None:
        self.strategy = strategy
        self.server_round = server_round
        self.reference = reference
        self.a = [np.zeros(r.shape, np.float64) for r in reference]  # sum n s y
        #: sum n s (x - x_b) of a restored buffer (else zeros); the results folded here add
        #: theirs as one weight per base model (:attr:`bases`), expanded by :attr:`c`
        self.c0 = [np.zeros(r.shape, np.float64) for r in reference]
        #: id of a base model -> (that model, sum n s of the results trained on it)
        self.bases: dict[int, tuple[NDArrays, float]] = {}
        self.scratch = [np.empty(r.shape, np.float64) for r in reference]
        self.s = 0.0  # sum n s
        self.n = 0.0  # sum n
        self.count = 0
        self.metrics: list[tuple[int, dict[str, Scalar]]] = []
        self.staleness: list[int] = []
        self.failures: list[BaseException] = []
        self.finalized = False

    def add(self, client: ClientProxy, result: FitRes) -> None:
        if not isinstance(result, FitRes):
            raise InvalidUpdate(client.cid, self.server_round, "fit", "reply is not a FitRes")
        strategy = self.strategy
        staleness, weight, base = strategy.arrived(client, self.server_round)
        n = float(strategy.sampling.weight(result.num_examples))
        ns = n * weight
        # in place, through one float64 scratch per layer (no temporaries per result)
        for acc, y, tmp in zip(
            self.a, parameters_to_ndarrays(result.parameters), self.scratch, strict=True
        ):
            np.multiply(y, ns, out=tmp, dtype=np.float64)
            acc += tmp
        if staleness > 0:  # results on one base share one (x - x_b), expanded once
            _, total = self.bases.get(id(base), (base, 0.0))
            self.bases[id(base)] = (base, total + ns)
        self.s += ns
        self.n += n
        self.count += 1
        self.staleness.append(staleness)
        self.metrics.append((result.num_examples, result.metrics))

    @property
    def c(self) -> list[NDArray]:
        """``sum n s (x - x_b)`` over the results folded so far (new arrays)."""
        out = [c.copy() for c in self.c0]
        for base, weight in self.bases.values():
            for acc, x, b, tmp in zip(out, self.reference, base, self.scratch, strict=True):
                np.subtract(x, b, out=tmp, dtype=np.float64)
                tmp *= weight
                acc += tmp
        return out

    def add_failure(self, failure: BaseException) -> None:
        self.strategy.failed(failure)
        self.failures.append(failure)

    def finalize(self) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.finalized = True
        strategy = self.strategy
        if self.count == 0 or self.n <= 0:
            return None, {}
        if self.failures and not strategy.sampling.accept_failures:
            return None, {}
        new = strategy.update(self.reference, self.a, self.c, self.s, self.n)
        params = strategy.published(ndarrays_to_parameters(new))
        metrics = strategy.fit_metrics(self.metrics)
        metrics["staleness_mean"] = float(np.mean(self.staleness))
        metrics["staleness_max"] = int(max(self.staleness))
        return params, metrics

    # -- checkpoints: the open buffer --------------------------------------------------------

    def dump(self, state: RecordDict) -> None:
        state.array_records[_BUFFER + ".a"] = {str(i): a for i, a in enumerate(self.a)}
        state.array_records[_BUFFER + ".c"] = {str(i): c for i, c in enumerate(self.c)}
        state.config_records[_BUFFER] = {
            "s": self.s,
            "n": self.n,
            "count": self.count,
            "staleness": json.dumps(self.staleness),
            "metrics": json.dumps([[n, dict(m)] for n, m in self.metrics]),
        }

    @staticmethod
    def read(state: RecordDict) -> dict[str, Any] | None:
        meta = state.config_records.get(_BUFFER)
        if meta is None:
            return None
        try:
            a = state.array_records[_BUFFER + ".a"]
            c = state.array_records[_BUFFER + ".c"]
            return {
                "a": [np.array(a[str(i)], np.float64) for i in range(len(a))],
                "c": [np.array(c[str(i)], np.float64) for i in range(len(c))],
                "s": float(meta["s"]),
                "n": float(meta["n"]),
                "count": int(meta["count"]),
                "staleness": [int(t) for t in json.loads(str(meta["staleness"]))],
                "metrics": [(int(n), dict(m)) for n, m in json.loads(str(meta["metrics"]))],
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the saved FedBuff buffer is incomplete: {exc}") from exc

    def load(self, saved: dict[str, Any]) -> None:
        shapes = [r.shape for r in self.reference]
        if [a.shape for a in saved["a"]] != shapes or [c.shape for c in saved["c"]] != shapes:
            raise CheckpointError(
                "the saved FedBuff buffer does not match the model's layer shapes; the "
                "checkpoint belongs to another model"
            )
        self.a, self.c0, self.bases = saved["a"], saved["c"], {}
        self.s, self.n, self.count = saved["s"], saved["n"], saved["count"]
        self.staleness, self.metrics = saved["staleness"], saved["metrics"]
