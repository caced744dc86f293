"""The agent's few Prometheus metrics, on a registry passed in (one agent per registry).

Counters (prometheus-client adds `_total`): `citadel_agent_certificates_issued` (every certificate
obtained, the first included), `citadel_agent_renewals` (those that replaced a served one),
`citadel_agent_csr_failures{reason}` (unavailable, rejected, bad_response, token, error),
`citadel_agent_sds_pushes{secret}` and `citadel_agent_sds_nacks{secret}`. Gauges:
`citadel_agent_cert_expiry_timestamp` (unix time the served certificate expires) and
`citadel_agent_sds_streams` (open SDS streams).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class AgentMetrics:
    """Counters and gauges of one workload agent."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.issued = Counter("citadel_agent_certificates_issued", "workload certificates obtained from the CA",
                              registry=registry)
        self.renewals = Counter("citadel_agent_renewals", "certificates that replaced a served one",
                                registry=registry)
        self.failures = Counter("citadel_agent_csr_failures", "failed attempts to obtain a certificate, by reason",
                                ["reason"], registry=registry)
        self.expiry = Gauge("citadel_agent_cert_expiry_timestamp", "unix time the served certificate expires",
                            registry=registry)
        self.pushes = Counter("citadel_agent_sds_pushes", "secrets sent to Envoy over SDS", ["secret"],
                              registry=registry)
        self.nacks = Counter("citadel_agent_sds_nacks", "SDS responses Envoy rejected", ["secret"],
                             registry=registry)
        self.streams = Gauge("citadel_agent_sds_streams", "open SDS streams", registry=registry)
