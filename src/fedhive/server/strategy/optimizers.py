"""Server optimizers: how the aggregate moves the global model.

A server optimizer receives the current global model ``x`` and the pseudo-gradient
``delta = aggregate - x`` and returns the next model. Plain averaging is
``ServerSGD(lr=1.0)``: ``x + delta == aggregate``. All arithmetic is in float64; the
returned arrays are float64 and the strategy casts them back to the model's dtypes.

Memory: :class:`ServerSGD` without momentum keeps nothing; with momentum it keeps one
float64 copy of the model, and :class:`Adaptive` keeps two (first and second moments).

State goes into checkpoints through :meth:`state_dict` / :meth:`load_state_dict`, as a
:class:`~fedhive.common.records.RecordDict` with records ``"server_optimizer"`` (config:
kind and step count) and ``"server_optimizer.<moment>"`` (one float64 array per layer).

Example::

    opt = ServerSGD(lr=1.0, momentum=0.9)
    new = opt.step(x, [a - b for a, b in zip(aggregate, x)])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, final

import numpy as np

from fedhive.common.errors import ConfigError
from fedhive.common.records import NDArray, NDArrays, RecordDict

__all__ = [
    "Adaptive",
    "SecondMoment",
    "ServerOptimizer",
    "ServerSGD",
    "adagrad_moment",
    "adam_moment",
    "yogi_moment",
]

_RECORD = "server_optimizer"


class ServerOptimizer(Protocol):
    """Turns (global model, pseudo-gradient) into the next global model."""

    def step(self, params: Sequence[NDArray], delta: Sequence[NDArray]) -> NDArrays: ...

    def state_dict(self) -> RecordDict: ...

    def load_state_dict(self, state: RecordDict) -> None: ...


def check_positive(name: str, value: float) -> float:
    """``value`` as a float, or :class:`ConfigError` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < np.inf:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: float) -> float:
    """``value`` as a float, or :class:`ConfigError` unless ``0 <= value < 1``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _as64(arrays: Sequence[NDArray]) -> list[NDArray]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _check_layout(name: str, state: list[NDArray], delta: list[NDArray]) -> None:
    shapes = [a.shape for a in state]
    if shapes != [d.shape for d in delta]:
        raise ConfigError(
            f"the {name} state has layer shapes {shapes} but the model has "
            f"{[d.shape for d in delta]}; the model changed or the checkpoint belongs to "
            "another run"
        )


def _save(kind: str, steps: int, moments: dict[str, list[NDArray] | None]) -> RecordDict:
    state = RecordDict(config_records={_RECORD: {"kind": kind, "steps": steps}})
    for name, arrays in moments.items():
        if arrays is not None:
            state.array_records[f"{_RECORD}.{name}"] = {str(i): a for i, a in enumerate(arrays)}
    return state


def _load(kind: str, state: RecordDict, names: Sequence[str]) -> tuple[int, dict[str, NDArrays]]:
    """(steps, moments) from ``state``; (0, {}) when it holds no optimizer state."""
    meta = state.config_records.get(_RECORD)
    if meta is None:
        return 0, {}
    if meta.get("kind") != kind:
        raise ConfigError(
            f"the saved server optimizer is {meta.get('kind')!r}, this strategy uses {kind!r}"
        )
    moments = {}
    for name in names:
        record = state.array_records.get(f"{_RECORD}.{name}")
        if record is not None:
            moments[name] = [np.array(record[str(i)], dtype=np.float64) for i in range(len(record))]
    steps = meta.get("steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"the saved server optimizer step count is invalid: {steps!r}")
    return steps, moments


@final
class ServerSGD:
    """SGD with heavy-ball momentum on the pseudo-gradient (FedAvgM).

    Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification." arXiv:1909.06335, 2019.

    ``v <- momentum * v + delta`` (``v = delta`` on the first step), then
    ``x <- x + lr * v``. With ``momentum == 0`` no state is kept (an empty
    :meth:`state_dict`).
    """

    kind = "sgd"

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        self.lr = check_positive("server_learning_rate", lr)
        self.momentum = check_unit_interval("server_momentum", momentum)
        self.velocity: list[NDArray] | None = None

    def __repr__(self) -> str:
        return f"ServerSGD(lr={self.lr}, momentum={self.momentum})"

    def step(self, params: Sequence[NDArray], delta: Sequence[NDArray]) -> NDArrays:
        d = _as64(delta)
        if self.momentum > 0:
            if self.velocity is None:
                self.velocity = d
            else:
                _check_layout("momentum", self.velocity, d)
                self.velocity = [
                    self.momentum * v + g for v, g in zip(self.velocity, d, strict=True)
                ]
            d = self.velocity
        return [x + self.lr * g for x, g in zip(_as64(params), d, strict=True)]

    def state_dict(self) -> RecordDict:
        if self.velocity is None:
            return RecordDict()  # nothing to carry: plain SGD is stateless
        return _save(self.kind, 0, {"velocity": self.velocity})

    def load_state_dict(self, state: RecordDict) -> None:
        _, moments = _load(self.kind, state, ["velocity"])
        self.velocity = moments.get("velocity")


SecondMoment = Callable[[NDArray, NDArray, float], NDArray]
"""``(v, delta**2, beta_2) -> new v``: what tells Adam, Yogi and Adagrad apart."""


def adam_moment(v: NDArray, g2: NDArray, beta_2: float) -> NDArray:
    """Adam: ``v <- beta_2 v + (1 - beta_2) delta^2``."""
    out: NDArray = beta_2 * v + (1.0 - beta_2) * g2
    return out


def yogi_moment(v: NDArray, g2: NDArray, beta_2: float) -> NDArray:
    """Yogi: ``v <- v - (1 - beta_2) delta^2 sign(v - delta^2)`` (additive, so v decays slowly)."""
    out: NDArray = v - (1.0 - beta_2) * g2 * np.sign(v - g2)
    return out


def adagrad_moment(v: NDArray, g2: NDArray, beta_2: float) -> NDArray:
    """Adagrad: ``v <- v + delta^2`` (``beta_2`` is unused)."""
    out: NDArray = v + g2
    return out


_MOMENTS: dict[str, SecondMoment] = {
    "adam": adam_moment,
    "yogi": yogi_moment,
    "adagrad": adagrad_moment,
}


@final
class Adaptive:
    """Adaptive server optimizers of FedAdam, FedYogi and FedAdagrad.

    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
    Optimization." ICLR 2021, Algorithm 2::

        m <- beta_1 m + (1 - beta_1) delta
        v <- second_moment(v, delta^2, beta_2)        # adam, yogi or adagrad
        x <- x + eta * m / (sqrt(v) + tau)

    ``m`` starts at 0. ``initial_v`` is where ``v`` starts: ``"tau2"`` (``tau^2``, the
    paper) or ``"zero"`` (Flower). ``bias_correction``: ``False`` (none, the paper),
    ``True`` or ``"adam"`` (``m`` and ``v`` divided by ``1 - beta_1^t`` and
    ``1 - beta_2^t``, as Kingma & Ba's Adam does), or ``"flower"`` (Flower's FedAdam: the
    step size is ``eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` with ``tau``
    outside the square root). ``t`` counts the steps taken, 1 on the first (the round
    number when every round aggregates).
    """

    def __init__(
        self,
        kind: str,
        *,
        eta: float,
        beta_1: float,
        beta_2: float,
        tau: float,
        bias_correction: bool | str = False,
        initial_v: str = "tau2",
    ) -> None:
        if kind not in _MOMENTS:
            raise ConfigError(f"kind must be one of {sorted(_MOMENTS)}, got {kind!r}")
        self.kind = kind
        self.second_moment = _MOMENTS[kind]
        self.eta = check_positive("eta", eta)
        self.beta_1 = check_unit_interval("beta_1", beta_1)
        self.beta_2 = check_unit_interval("beta_2", beta_2)
        self.tau = check_positive("tau", tau)
        corrections = {False: "none", True: "adam", "adam": "adam", "flower": "flower"}
        if not isinstance(bias_correction, bool | str) or bias_correction not in corrections:
            raise ConfigError(
                f"bias_correction must be False, True, 'adam' or 'flower', got {bias_correction!r}"
            )
        if initial_v not in ("tau2", "zero"):
            raise ConfigError(f"initial_v must be 'tau2' or 'zero', got {initial_v!r}")
        self.bias_correction = corrections[bias_correction]
        self.initial_v = initial_v
        self.m: list[NDArray] | None = None
        self.v: list[NDArray] | None = None
        self.steps = 0

    def __repr__(self) -> str:
        return (
            f"Adaptive({self.kind!r}, eta={self.eta}, beta_1={self.beta_1}, "
            f"beta_2={self.beta_2}, tau={self.tau})"
        )

    def step(self, params: Sequence[NDArray], delta: Sequence[NDArray]) -> NDArrays:
        d = _as64(delta)
        if self.m is None or self.v is None:
            self.m = [np.zeros_like(g) for g in d]
            v0 = self.tau**2 if self.initial_v == "tau2" else 0.0
            self.v = [np.full_like(g, v0) for g in d]
        _check_layout("first moment", self.m, d)
        _check_layout("second moment", self.v, d)
        b1, b2 = self.beta_1, self.beta_2
        self.m = [b1 * m + (1.0 - b1) * g for m, g in zip(self.m, d, strict=True)]
        self.v = [self.second_moment(v, g * g, b2) for v, g in zip(self.v, d, strict=True)]
        self.steps += 1
        eta, scale_m, scale_v = self.eta, 1.0, 1.0
        if self.bias_correction == "adam":
            scale_m, scale_v = 1.0 - b1**self.steps, 1.0 - b2**self.steps
        elif self.bias_correction == "flower":
            t = self.steps + 1
            eta = self.eta * np.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        return [
            x + eta * (m / scale_m) / (np.sqrt(np.maximum(v, 0.0) / scale_v) + self.tau)
            for x, m, v in zip(_as64(params), self.m, self.v, strict=True)
        ]

    def state_dict(self) -> RecordDict:
        return _save(self.kind, self.steps, {"m": self.m, "v": self.v})

    def load_state_dict(self, state: RecordDict) -> None:
        self.steps, moments = _load(self.kind, state, ["m", "v"])
        self.m, self.v = moments.get("m"), moments.get("v")
