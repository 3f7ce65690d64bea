"""Sample-level DP-SGD on a client, with Opacus computing per-example gradients.

DP-SGD (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang. "Deep Learning with
Differential Privacy." CCS 2016): each step draws a Poisson batch (every example joins
with probability ``q = batch_size / n``), clips every example's gradient to
``max_grad_norm``, sums, adds Gaussian noise with std ``noise_multiplier *
max_grad_norm`` and divides by the expected batch size. Opacus (Yousefpour et al. 2021,
"Opacus: User-Friendly Differential Privacy Library in PyTorch") computes the per-example
gradients and clips them; fedhive draws the batches and the noise itself:

- Opacus's own noise would come from torch's generator (seeded, replayable) unless
  ``secure_mode`` is on, which needs ``torchcsprng`` (not available for current torch).
  The optimizer therefore runs with zero Opacus noise and a step hook adds noise from
  :class:`~fedhive.privacy.noise.SecureGaussian` (``os.urandom``). ``noise_seed`` (tests
  only) replaces it with a seeded source and marks the result ``not_private``.
- Batches are drawn with a numpy generator seeded by ``seed`` or, with ``seed=None``
  (the default, and what deployments use), from ``os.urandom``. Never seed it from a
  value the server derives (``context.seed``): the server would then know which
  examples each step used, and the amplification by sampling that the accountant
  counts on would not hold against it. A fixed seed is for tests and simulations only.
  Nothing here reads or changes torch's or numpy's global random state. A step whose
  Poisson batch is empty still applies noise.

The client's privacy ledger lives in its persistent state (``context.state``, a
``RecordDict``, under ``"dpsgd.accountant"``), so epsilon accumulates over every round
this client trains; the RDP accountant of ``dp-accounting`` turns it into epsilon.
This is example-level privacy for that client's data set, not user-level privacy.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhive.common.errors import ConfigError, MissingDependency
from fedhive.common.message import derive_seed
from fedhive.common.records import RecordDict, Scalar
from fedhive.privacy.accounting import PrivacyAccountant, Release, _check_delta
from fedhive.privacy.noise import NoiseSource, SecureGaussian, SeededGaussian

__all__ = ["DpSgdResult", "LEDGER", "max_client_epsilon", "train_dpsgd"]

LEDGER = "dpsgd.accountant"


@dataclass(frozen=True)
class DpSgdResult:
    """What one call of :func:`train_dpsgd` did, and the client's epsilon after it."""

    epsilon: float
    delta: float
    steps: int
    total_steps: int
    sampling_rate: float
    loss: float
    private: bool

    def metrics(self) -> dict[str, Scalar]:
        """Fit metrics for the client's reply (``"epsilon"`` is this client's total)."""
        out: dict[str, Scalar] = {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "dpsgd_steps": self.total_steps,
            "train_loss": self.loss,
        }
        if not self.private:
            out["dp_not_private"] = True
        return out


def _imports() -> tuple[Any, Any, Any]:
    try:
        import torch
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer
    except ImportError as exc:
        raise MissingDependency("opacus", "privacy") from exc
    return torch, GradSampleModule, DPOptimizer


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return float(value)


def _noise_multiplier(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"noise_multiplier must be a number >= 0, got {value!r}")
    return float(value)


def train_dpsgd(
    model: Any,
    x: Any,
    y: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    state: RecordDict,
    seed: int | None = None,
    noise_seed: int | None = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
) -> DpSgdResult:
    """Train ``model`` in place with DP-SGD and return this client's epsilon so far.

    ``x`` and ``y`` are arrays or tensors (``y`` class indices for the default
    cross-entropy loss). Each epoch is ``round(n / batch_size)`` Poisson-sampled steps.
    ``state`` is the client's persistent ``context.state``; the ledger in it grows by
    this call's steps.

    Example::

        result = train_dpsgd(model, x, y, epochs=1, batch_size=32, lr=0.1,
                             noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5,
                             state=context.state)  # batches from os.urandom
        return new_weights, len(x), result.metrics()
    """
    torch, grad_sample_module, dp_optimizer = _imports()
    _positive_int("epochs", epochs)
    _positive_int("batch_size", batch_size)
    _positive("lr", lr)
    _positive("max_grad_norm", max_grad_norm)
    z = _noise_multiplier(noise_multiplier)
    _check_delta(delta)
    if not isinstance(state, RecordDict):
        raise ConfigError(f"state must be the client's context.state (RecordDict), got {state!r}")
    xs, ys = torch.as_tensor(x), torch.as_tensor(y)
    n = int(xs.shape[0])
    if n < 1 or int(ys.shape[0]) != n:
        raise ConfigError(
            f"x and y must hold the same number (>= 1) of examples, got {n}, {ys.shape[0]}"
        )
    if batch_size > n:
        raise ConfigError(f"batch_size {batch_size} exceeds the {n} examples of this client")
    q = batch_size / n
    steps = epochs * max(1, round(n / batch_size))
    ledger = PrivacyAccountant("poisson", "rdp")
    ledger.load_state_dict(state, LEDGER)

    noise: NoiseSource = (
        SecureGaussian()
        if noise_seed is None
        else SeededGaussian(derive_seed(noise_seed, ledger.rounds, "", "dpsgd-noise"))
    )
    sampler = np.random.default_rng(seed if seed is not None else secrets.randbits(63))
    stddev = z * max_grad_norm / batch_size  # noise on the mean gradient

    def noise_like(param: Any) -> Any:
        draw = noise.standard_normal(tuple(param.shape)) * stddev
        return torch.from_numpy(draw).to(dtype=param.dtype, device=param.device)

    def add_noise(optimizer: Any) -> None:
        if stddev > 0:
            for param in optimizer.params:
                param.grad += noise_like(param)

    criterion = loss_fn or torch.nn.functional.cross_entropy
    wrapped = grad_sample_module(model, batch_first=True, loss_reduction="mean")
    inner = torch.optim.SGD(wrapped.parameters(), lr=lr)
    optimizer = dp_optimizer(
        inner,
        noise_multiplier=0.0,  # fedhive adds the noise in the step hook, from a secure source
        max_grad_norm=max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction="mean",
    )
    optimizer.attach_step_hook(add_noise)
    losses: list[float] = []
    taken = 0  # steps started: each may have touched the data, so each is charged
    model.train()
    try:
        for _ in range(steps):
            taken += 1
            batch = np.flatnonzero(sampler.random(n) < q)
            optimizer.zero_grad(set_to_none=True)
            if batch.size == 0:
                for param in optimizer.params:
                    param.grad = noise_like(param)
                inner.step()
                continue
            inputs = xs[torch.from_numpy(batch)]
            if inputs.is_floating_point():
                # Opacus's module hooks warn when no input requires a gradient.
                inputs.requires_grad_(True)
            loss = criterion(wrapped(inputs), ys[torch.from_numpy(batch)])
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        optimizer.zero_grad(set_to_none=True)
        wrapped._close()
        # charged even when training raised midway: the steps already taken were released
        if taken:
            ledger.record(Release(z, sampling_rate=q), taken)
        saved = ledger.state_dict(LEDGER)
        state.array_records.update(saved.array_records)
        state.config_records.update(saved.config_records)
    return DpSgdResult(
        epsilon=ledger.epsilon(delta),
        delta=delta,
        steps=steps,
        total_steps=ledger.rounds,
        sampling_rate=q,
        loss=float(np.mean(losses)) if losses else float("nan"),
        private=noise_seed is None,
    )


def max_client_epsilon(pairs: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """A ``fit_metrics_aggregation_fn`` reporting the largest client ``"epsilon"``."""
    values = [float(m["epsilon"]) for _, m in pairs if isinstance(m.get("epsilon"), int | float)]
    return {"epsilon": max(values)} if values else {}
