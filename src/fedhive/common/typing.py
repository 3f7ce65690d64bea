"""Flower's ``flwr.common.typing``: the type names Flower code imports from there.

Everything here is defined elsewhere in fedhive (mostly :mod:`fedhive.common.records`)
and only gathered under Flower's module name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from fedhive.common.records import (
    Code,
    Config,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Metrics,
    NDArray,
    NDArrays,
    Parameters,
    Properties,
    ReconnectIns,
    Scalar,
    Status,
)

__all__ = [
    "Code",
    "Config",
    "DisconnectRes",
    "EvaluateIns",
    "EvaluateRes",
    "FitIns",
    "FitRes",
    "GetParametersIns",
    "GetParametersRes",
    "GetPropertiesIns",
    "GetPropertiesRes",
    "Metrics",
    "MetricsAggregationFn",
    "NDArray",
    "NDArrays",
    "Parameters",
    "Properties",
    "ReconnectIns",
    "Scalar",
    "Status",
]

#: ``[(num_examples, metrics), ...] -> aggregated metrics`` (strategies'
#: ``fit_metrics_aggregation_fn`` and ``evaluate_metrics_aggregation_fn``).
MetricsAggregationFn: TypeAlias = Callable[[list[tuple[int, Metrics]]], Metrics]
