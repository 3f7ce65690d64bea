"""Stragglers in the config: the ``[system]`` table and the policy the strategy table implies.

``[system]`` simulates device heterogeneity (:class:`~fedhive.simulation.system.SystemModel`);
with it ``fedhive run`` uses the virtual clock and every round records ``virtual_time_s``::

    [system]
    latency = "lognormal"    # lognormal | pareto | halfnormal | exponential | constant | trace
    sigma = 1.5              # spread of per-client speed
    bandwidth_mbps = 10.0    # link speed
    trace = ""               # CSV: client, speed, up_mbps, down_mbps, availability
    dropout = 0.0            # probability that a task is abandoned midway

The policy a run takes follows from ``[strategy]`` and ``[policy]``
(:func:`run_policy`): an asynchronous strategy (``fedbuff``, ``fedasync``) runs buffered
asynchronous aggregation with its own ``buffer_size``, ``concurrency``,
``max_staleness`` and (FedBuff) ``checkpoint_every``; a synchronous one with
``deadline_s``, ``over_selection`` or ``partial_work`` runs
:class:`~fedhive.server.deadline.DeadlineRounds`; otherwise ``[policy]`` decides.
Combinations that cannot work are refused in the config's terms
(:func:`check_strategy_policy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from fedhive.cli.policies import PolicyConfig
from fedhive.cli.strategies import FedBuffConfig, StrategyConfig
from fedhive.server.policy import RunPolicy

if TYPE_CHECKING:
    from fedhive.simulation.system import SystemModel

__all__ = ["SystemConfig", "check_strategy_policy", "is_asynchronous", "run_policy"]

_ROUND_KEYS = ("deadline_s", "over_selection", "partial_work")


class SystemConfig(BaseModel):
    """``[system]``: simulated devices (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency: Literal["lognormal", "pareto", "halfnormal", "exponential", "constant", "trace"] = (
        "lognormal"
    )
    sigma: float = Field(1.5, ge=0, allow_inf_nan=False, description="spread of client speed")
    bandwidth_mbps: float = Field(10.0, gt=0, allow_inf_nan=False, description="link speed")
    trace: str = Field("", description="CSV: client, speed, up_mbps, down_mbps, availability")
    dropout: float = Field(0.0, ge=0, lt=1, description="probability a task is abandoned")

    def build(self, num_examples: Mapping[str, int], seed: int) -> SystemModel:
        """The :class:`~fedhive.simulation.system.SystemModel` of this table, for clients
        with ``num_examples`` training examples each."""
        from fedhive.simulation.system import SystemModel

        return SystemModel(
            latency=self.latency,
            sigma=self.sigma,
            bandwidth_mbps=self.bandwidth_mbps,
            trace=self.trace,
            dropout=self.dropout,
            num_examples=dict(num_examples),
            seed=seed,
        )


def is_asynchronous(st: StrategyConfig) -> bool:
    """Whether the table's strategy runs without rounds (FedBuff, FedAsync)."""
    return "concurrency" in type(st).model_fields and "staleness" in type(st).model_fields


def _round_keys(st: StrategyConfig) -> list[str]:
    return [k for k in _ROUND_KEYS if getattr(st, k, None)]


def check_strategy_policy(
    st: StrategyConfig, policy: PolicyConfig, num_clients: int | None, secure: bool
) -> None:
    """Refuse what cannot run: an asynchronous strategy beside an explicit policy or more
    ``concurrency`` than clients; deadline keys under an asynchronous policy or with
    secure aggregation (whose round needs every sampled client)."""
    if is_asynchronous(st):
        if policy.name != "sync":
            raise PydanticCustomError(
                "config_parameter",
                "strategy '{name}' brings its own asynchronous policy (buffer_size, "
                "concurrency and max_staleness under [strategy]); remove the [policy] table",
                {"field": "name", "value": policy.name, "section": "policy", "name": st.name},
            )
        concurrency = int(getattr(st, "concurrency", 1))
        if num_clients is not None and concurrency > num_clients:
            raise PydanticCustomError(
                "strategy_parameter",
                "only num_clients = {have} clients exist, so no more than {have} can train "
                "at once; lower strategy.concurrency or raise num_clients",
                {
                    "field": "concurrency",
                    "value": concurrency,
                    "section": "strategy",
                    "have": num_clients,
                },
            )
        return
    keys = _round_keys(st)
    if not keys:
        return
    if not policy.synchronous:
        raise PydanticCustomError(
            "strategy_parameter",
            "{keys} shape synchronous rounds; policy '{policy}' has none. Drop them or the "
            "[policy] table",
            {"field": keys[0], "value": getattr(st, keys[0]), "section": "strategy",
             "keys": ", ".join(keys), "policy": policy.name},
        )  # fmt: skip
    if secure:
        raise PydanticCustomError(
            "strategy_parameter",
            "secure aggregation needs the masked update of every sampled client, so a "
            "round cannot end at a deadline or drop over-selected clients ({keys}); drop "
            "them or secure_aggregation",
            {
                "field": keys[0],
                "value": getattr(st, keys[0]),
                "section": "strategy",
                "keys": ", ".join(keys),
            },
        )
    if st.partial_work and st.deadline_s is None:
        raise PydanticCustomError(
            "strategy_parameter",
            "partial_work trains what fits before the deadline; set strategy.deadline_s",
            {"field": "partial_work", "value": True, "section": "strategy"},
        )


def run_policy(st: StrategyConfig, policy: PolicyConfig) -> RunPolicy | None:
    """The run policy of a checked config; ``None``: the strategy's own (asynchronous),
    unless the strategy table asks for mid-buffer checkpoints (FedBuff's
    ``checkpoint_every``), which are the policy's: then that policy, built from the same
    table."""
    if is_asynchronous(st):
        if not isinstance(st, FedBuffConfig) or st.checkpoint_every is None:
            return None
        from fedhive.server.asynchronous import BufferedAsync

        return BufferedAsync(
            buffer_size=st.buffer_size,
            concurrency=st.concurrency,
            max_staleness=st.max_staleness,
            checkpoint_every=st.checkpoint_every,
        )
    if _round_keys(st):
        from fedhive.server.deadline import DeadlineRounds

        return DeadlineRounds(
            deadline_s=st.deadline_s, over_selection=st.over_selection, partial_work=st.partial_work
        )
    return policy.build()
