"""Fault injection: the Envoy HTTP fault filter and its per-route configuration.

The filter sits in the outbound HTTP filter chain (before the router) with an empty config, so
it does nothing until a route carries a fault in ``typed_per_filter_config``: adding or removing
a fault then changes only RDS, never the listener (no connection drain). Istio percentages are
floats in [0, 100]; Envoy takes them as parts per million.
"""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.v3 import percent_pb2

from pilot.model import mesh as m

FAULT_FILTER = "envoy.filters.http.fault"
_MILLION = 1_000_000


def fractional_percent(percent: float) -> Any:
    """Istio's float percentage as an Envoy fraction of a million (0.1% -> 1000/1000000)."""
    return percent_pb2.FractionalPercent(
        numerator=round(percent * _MILLION / 100), denominator=percent_pb2.FractionalPercent.MILLION
    )


def fault_filter() -> Any:
    flt = hcm_pb2.HttpFilter(name=FAULT_FILTER)
    flt.typed_config.Pack(fault_pb2.HTTPFault())
    return flt


def fault_config(fault: m.Fault) -> Any:
    """The per-route HTTPFault for ``typed_per_filter_config[FAULT_FILTER]``."""
    out = fault_pb2.HTTPFault()
    if fault.delay is not None:
        out.delay.fixed_delay.FromTimedelta(fault.delay)
        out.delay.percentage.CopyFrom(fractional_percent(fault.delay_percent))
    if fault.abort_http_status is not None:
        out.abort.http_status = fault.abort_http_status
    elif fault.abort_grpc_status is not None:
        out.abort.grpc_status = fault.abort_grpc_status
    if out.HasField("abort"):
        out.abort.percentage.CopyFrom(fractional_percent(fault.abort_percent))
    return out
