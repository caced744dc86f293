"""Pilot's settings, built once by the CLI (or a test) and passed down; never read at import."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PilotSettings(BaseSettings):
    """Where pilot listens and what it serves. Environment variables MESHCTL_PILOT_* override."""

    model_config = SettingsConfigDict(env_prefix="MESHCTL_PILOT_", frozen=True)

    ads_host: str = "127.0.0.1"
    ads_port: int = Field(15010, ge=0, le=65535, description="plaintext xDS (local mesh); 0 picks a free port")
    xds_tls_host: str = "127.0.0.1"
    xds_tls_port: int = Field(
        15012, ge=0, le=65535,
        description="authenticated xDS over mutual TLS (served only when given TLS credentials); 0 picks a free port")
    debug_host: str = "127.0.0.1"
    debug_port: int = Field(15014, ge=0, le=65535, description="HTTP monitoring and debug; 0 picks a free port")
    config_dir: Path | None = None
    debounce_ms: int = Field(100, ge=0, description="quiet time after a config change before a push")
    debounce_max_ms: int = Field(1000, ge=0, description="longest a push waits while changes keep coming")
    endpoint_debounce_ms: int = Field(10, ge=0, description="quiet time when only endpoints (WorkloadEntry) changed")
    file_watch: Literal["events", "poll"] = Field(
        "events", description="events: woken by file events (inotify...); poll: stat() every file_poll_ms")
    file_poll_ms: int = Field(25, ge=10, description="how often the file source looks for changed files when polling")
    file_rescan_ms: int = Field(1000, ge=10, description="safety sweep for changes file events missed")
    file_settle_ms: int = Field(
        700, ge=0, description="a file must stay unchanged this long before it may remove objects (or be rejected)")
    file_max_total_mb: int = Field(64, ge=1, description="all config files together; files past it are not loaded")
    send_timeout_ms: int = Field(
        30_000, ge=0, description="a proxy that does not take a response this long has its stream closed; 0: never")
    write_budget_mb: int = Field(
        32, ge=0, description="connecting proxies' large first xDS responses (64 KB or more) gRPC may hold at "
        "once; past it a stream waits its turn, while the budget drains (`pilot.xds.writebudget`); 0: unbounded")
    ack_hold_ms: int = Field(
        1000, ge=0, description="while pilot writes a push, a stream's next request after a plain ACK is read "
        "once the writes end, this long at most (`pilot.xds.writewave`); 0: never held")
    vhds: bool = Field(
        True, description="sidecars on delta streams from Envoy 1.37 or later take their route configurations' "
        "virtual hosts over VHDS, so a route change sends only the virtual hosts it changed (`pilot.translate.vhds`)")
    max_connection_age_ms: int = Field(
        1_800_000, ge=0,
        description="gRPC closes each xDS connection gracefully at this age (as istiod: 30 min); 0: never")
    cluster_domain: str = "cluster.local"
    trust_domain: str = Field("cluster.local", description="SPIFFE trust domain of workload identities pilot's "
                              "TLS contexts expect (`meshctl up --trust-domain`)")
    root_namespace: str = Field("istio-system", description="config root namespace: its PeerAuthentication, "
                                "AuthorizationPolicy and Sidecar apply mesh-wide (on a cluster the mesh "
                                "ConfigMap's rootNamespace wins)")
    kubeconfig: Path | None = Field(None, description="a cluster's kubeconfig: mesh config from its API server")
    kube_in_cluster: bool = Field(False, description="the API server of the pod pilot runs in (its service account)")
    kube_mesh_namespace: str = Field("istio-system", description="control-plane namespace: the `istio` mesh ConfigMap")
    kube_sync_timeout_ms: int = Field(30_000, ge=0, description="the first push waits this long for the first lists")
    loop_stall_ms: int = Field(
        1000, ge=0, description="an event-loop stall this long is logged with the stack holding it and counted "
        "(`pilot.loopwatch`); 0: not watched")
    gc_young_threshold: int = Field(
        50_000, ge=0, description="allocations between young garbage collections (`meshctl up`); 0: Python's 700")
    leader_election: bool = Field(
        True, description="with a cluster: singleton duties (status writes, CA root rotation) run only on the replica "
        "holding their Lease; off: this pilot runs them (a single replica)")
    lease_duration_ms: int = Field(30_000, ge=1, description="Lease duration (Istio: 30 s)")
    lease_renew_deadline_ms: int = Field(15_000, ge=1, description="a leader that cannot renew this long steps down")
    lease_retry_period_ms: int = Field(7_500, ge=1, description="how often candidates try and the leader renews")
    pod_name: str = Field("", validation_alias=AliasChoices("MESHCTL_PILOT_POD_NAME", "POD_NAME"),
                          description="Lease holder identity (the pod's name); empty: host name + random suffix")
    kube_status: bool = Field(True, description="the status leader writes status.conditions on mesh objects")
    status_qps: float = Field(100.0, gt=0, description="status writes per second (Istio's PILOT_STATUS_QPS)")
    status_burst: int = Field(500, ge=1, description="status writes at once (Istio's PILOT_STATUS_BURST)")
    otlp_endpoint: str | None = Field(
        None, description="OpenTelemetry traces of config changes to this OTLP/HTTP (protobuf) URL, e.g. "
        "http://127.0.0.1:4318/v1/traces; unset: no tracing")
