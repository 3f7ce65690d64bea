"""Poisson sampling of cohorts: every client joins a round independently with prob. q.

Privacy amplification by Poisson subsampling (Abadi et al. 2016, "Deep Learning with
Differential Privacy"; Mironov, Talwar, Zhang 2019) needs exactly this sampling, while the
engine's :class:`~fedhive.server.SimpleClientManager` draws a fixed-size cohort. The DP
wrappers with ``sampling="poisson"`` draw the cohort here and hand it to the inner
strategy through :class:`CohortManager`, so the inner strategy's ``configure_fit`` (its
config, its FitIns) is reused unchanged.

Amplification assumes nobody outside the server learns who was sampled. With a
``seed`` the draw is reproducible from ``derive_seed(seed, round, "", "poisson-sample")``
(experiments); without one each round draws a fresh seed from ``os.urandom``.
"""

from __future__ import annotations

import secrets

import numpy as np

from fedhive.common.message import derive_seed
from fedhive.server.client_manager import ClientManager, ClientProxy, Criterion

__all__ = ["CohortManager", "poisson_cohort"]


def poisson_cohort(
    client_manager: ClientManager, sampling_rate: float, server_round: int, seed: int | None
) -> list[ClientProxy]:
    """Each available client, independently with probability ``sampling_rate``.

    Clients are considered in sorted id order so the same seed gives the same cohort
    whatever the registration order.
    """
    ids = sorted(client_manager.all())
    round_seed = (
        derive_seed(seed, server_round, "", "poisson-sample")
        if seed is not None
        else secrets.randbits(63)
    )
    keep = np.random.default_rng(round_seed).random(len(ids)) < sampling_rate
    return [ClientProxy(cid) for cid, k in zip(ids, keep, strict=True) if k]


class CohortManager:
    """A client manager whose ``sample`` returns a cohort chosen beforehand.

    Lets an inner strategy's ``configure_fit`` run on a Poisson cohort: whatever number
    of clients it asks for, it gets the cohort.
    """

    def __init__(self, inner: ClientManager, cohort: list[ClientProxy]) -> None:
        self.inner = inner
        self.cohort = list(cohort)

    def num_available(self) -> int:
        return self.inner.num_available()

    def all(self) -> dict[str, ClientProxy]:
        return self.inner.all()

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        return list(self.cohort)
