"""Secure aggregation (SecAgg+): the server learns the sum of the updates and nothing else.

Server: ``fit_workflow=SecAggPlusWorkflow(threshold=..., degree=..., bits=..., clip=...)``
(or ``secure_aggregation={...}`` in ``start_simulation``/``start_server`` and the TOML).
Clients: ``secaggplus_mod`` first in their mods. See docs/secure_aggregation.md for the
protocol, the threat model and the error bound.
"""

from fedhive.secagg.client import SecAggPlusMod, secaggplus_mod
from fedhive.secagg.config import SecAggConfig, default_degree, default_threshold
from fedhive.secagg.server import SecAggPlusWorkflow, check_secagg_compatible

__all__ = [
    "SecAggConfig",
    "SecAggPlusMod",
    "SecAggPlusWorkflow",
    "check_secagg_compatible",
    "default_degree",
    "default_threshold",
    "secaggplus_mod",
]
