"""The admission webhooks' metrics under Istio's names, so istiod dashboards and alerts work unchanged.

Facts from istio/istio `pkg/kube/inject/monitoring.go` and `pkg/webhooks/validation/server/monitoring.go`:

- `sidecar_injection_requests_total`: every `POST /inject`;
- `sidecar_injection_skip_total`: a pod the policy leaves alone (not enrolled, opted out,
  already injected, hostNetwork, ...);
- `sidecar_injection_failure_total`: a review that could not be done (not an AdmissionReview,
  the namespace unreadable, annotations that cannot be honoured);
- `sidecar_injection_success_total`: a review answered. As in Istio this counts every
  AdmissionReview response, so skips and refusals are in it too: a failure rate is
  `failure / requests`;
- `sidecar_injection_time_seconds`: the whole request (buckets .1, 1, 3, 5, 10, 20, 30, 60);
- `galley_validation_passed{group,version,resource}`: a mesh object admitted;
- `galley_validation_failed{group,version,resource,reason}`: `invalid_resource` (refused, with the
  field and reason in the response) or `unsupported_operation` (neither CREATE nor UPDATE:
  allowed, counted as Istio does). Dry runs (`kubectl apply --dry-run=server`) are not counted
  as failures, as in Istio;
- `galley_validation_http_error{status}`: a request that was not an AdmissionReview (400).

Sums are `pilot.metrics.IstioSum` (no `_total` added, Istio's exposition). Objects of kinds pilot
does not serve are admitted with a warning (`injector.validate`), so they count as passed, where
Istio would refuse them as `unknown_type`.

Cost: a dictionary update per counter, one histogram observation per injection request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from pilot.metrics import IstioSum

INJECTION_TIME_BUCKETS = (.1, 1, 3, 5, 10, 20, 30, 60)
RESOURCE_LABELS = ("group", "version", "resource")


class WebhookMetrics:
    """The injection and validation webhooks' counters, registered in `registry` (pilot's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.injection_requests = IstioSum(
            "sidecar_injection_requests_total", "Total number of sidecar injection requests.", (), registry)
        self.injection_success = IstioSum(
            "sidecar_injection_success_total", "Total number of successful sidecar injection requests.", (), registry)
        self.injection_failure = IstioSum(
            "sidecar_injection_failure_total", "Total number of failed sidecar injection requests.", (), registry)
        self.injection_skip = IstioSum(
            "sidecar_injection_skip_total", "Total number of skipped sidecar injection requests.", (), registry)
        self.injection_time = Histogram(
            "sidecar_injection_time_seconds", "Total time taken for injection in seconds.",
            buckets=INJECTION_TIME_BUCKETS, registry=registry)
        self.validation_passed = IstioSum("galley_validation_passed", "Resource is valid", RESOURCE_LABELS, registry)
        self.validation_failed = IstioSum(
            "galley_validation_failed", "Resource validation failed", (*RESOURCE_LABELS, "reason"), registry)
        self.validation_http_error = IstioSum(
            "galley_validation_http_error", "Resource validation http serve errors", ("status",), registry)

    def validated(self, request: Mapping[str, Any], failure: str) -> None:
        """Count one reviewed object: passed when `failure` is "", else failed for that reason
        (unless the request is a dry run, as Istio)."""
        resource = request.get("resource") or {}
        labels = tuple(str(resource.get(k) or "") for k in RESOURCE_LABELS)
        if not failure:
            self.validation_passed.inc(*labels)
        elif not request.get("dryRun"):
            self.validation_failed.inc(*labels, failure)
