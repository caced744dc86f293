"""Citadel's Prometheus metrics, with Istio's names, on a registry passed in.

Counters (prometheus-client adds `_total` on exposition, as for pilot's counters):
`citadel_server_csr_count`, `citadel_server_authentication_failure_count`,
`citadel_server_csr_parsing_err_count`, `citadel_server_csr_sign_err_count{error}`,
`citadel_server_success_cert_issuance_count`. Gauges: `citadel_server_root_cert_expiry_timestamp`,
`citadel_server_root_cert_expiry_seconds`, `citadel_server_cert_chain_expiry_timestamp`,
`citadel_server_cert_chain_expiry_seconds` (remaining seconds computed at scrape time).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from citadel.ca import CABundle


class CitadelMetrics:
    """The CA's counters and expiry gauges."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], datetime]) -> None:
        self.csr = Counter("citadel_server_csr_count", "CSRs received by the CA", registry=registry)
        self.authn_failures = Counter("citadel_server_authentication_failure_count",
                                      "CSR callers whose credential was missing, forged or expired",
                                      registry=registry)
        self.csr_parse_errors = Counter("citadel_server_csr_parsing_err_count", "CSRs that could not be parsed",
                                        registry=registry)
        self.sign_errors = Counter("citadel_server_csr_sign_err_count",
                                   "CSRs refused or failed at signing, by error", ["error"], registry=registry)
        self.success = Counter("citadel_server_success_cert_issuance_count", "certificates issued",
                               registry=registry)
        self.root_expiry = Gauge("citadel_server_root_cert_expiry_timestamp",
                                 "unix time when the root the CA signs under expires", registry=registry)
        self.root_expiry_seconds = Gauge("citadel_server_root_cert_expiry_seconds",
                                         "seconds until the root the CA signs under expires", registry=registry)
        self.chain_expiry = Gauge("citadel_server_cert_chain_expiry_timestamp",
                                  "unix time when the CA's signing certificate expires", registry=registry)
        self.chain_expiry_seconds = Gauge("citadel_server_cert_chain_expiry_seconds",
                                          "seconds until the CA's signing certificate expires", registry=registry)
        self._clock = clock

    def record_expiry(self, bundle: CABundle) -> None:
        """Point the expiry gauges at `bundle` (call whenever the CA's bundle changes)."""
        root_at = bundle.issuing_root.not_valid_after_utc
        chain_at = bundle.signing_cert.not_valid_after_utc
        self.root_expiry.set(root_at.timestamp())
        self.chain_expiry.set(chain_at.timestamp())
        self.root_expiry_seconds.set_function(self._seconds_until(root_at))
        self.chain_expiry_seconds.set_function(self._seconds_until(chain_at))

    def _seconds_until(self, when: datetime) -> Callable[[], float]:
        def remaining() -> float:
            return (when - self._clock()).total_seconds()
        return remaining
