"""Outlier detection: Istio's OutlierDetection on an Envoy cluster, with Istio's semantics.

Only consecutive-error ejection is on (success-rate ejection is switched off explicitly);
an unset consecutive5xxErrors keeps Envoy's 5, 0 disables it; gateway errors are off unless
set above 0; maxEjectionPercent 0 or unset keeps the 10% default; and the panic threshold is
minHealthPercent (default 0), so Envoy never sends traffic back to ejected hosts just
because few hosts are left.
"""

from __future__ import annotations

from typing import Any

from pilot.model.policy import OutlierDetection

ENFORCED = 100


def apply_outlier_detection(cluster: Any, od: OutlierDetection | None) -> None:
    if od is None:
        return
    out = cluster.outlier_detection
    out.enforcing_success_rate.value = 0
    if od.consecutive_5xx_errors is not None:
        out.consecutive_5xx.value = od.consecutive_5xx_errors
        out.enforcing_consecutive_5xx.value = ENFORCED if od.consecutive_5xx_errors else 0
    if od.consecutive_gateway_errors is not None:
        out.consecutive_gateway_failure.value = od.consecutive_gateway_errors
        out.enforcing_consecutive_gateway_failure.value = ENFORCED if od.consecutive_gateway_errors else 0
    if od.interval is not None:
        out.interval.FromTimedelta(od.interval)
    if od.base_ejection_time is not None:
        out.base_ejection_time.FromTimedelta(od.base_ejection_time)
    if od.max_ejection_percent:
        out.max_ejection_percent.value = od.max_ejection_percent
    if od.split_external_local_origin_errors:
        out.split_external_local_origin_errors = True
        if od.consecutive_local_origin_failures:
            out.consecutive_local_origin_failure.value = od.consecutive_local_origin_failures
            out.enforcing_consecutive_local_origin_failure.value = ENFORCED
        out.enforcing_local_origin_success_rate.value = 0
    cluster.common_lb_config.healthy_panic_threshold.value = float(od.min_health_percent or 0)
