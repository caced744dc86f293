"""Citadel's settings, built once by the CLI (or a test) and passed down; never read at import."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from citadel.keys import KeyAlgorithm


def istiod_dns_names(namespace: str, cluster_domain: str = "cluster.local") -> tuple[str, ...]:
    """The DNS SANs of istiod's certificate in control-plane namespace `namespace`: the names sidecars
    dial (`istiod.<ns>.svc`, the form an injected pod's discovery address uses, and its fully
    qualified form), and `localhost` for tools on the same machine."""
    return ("localhost", f"istiod.{namespace}.svc", f"istiod.{namespace}.svc.{cluster_domain}")


class CitadelSettings(BaseSettings):
    """The CA and its CSR service. Environment variables MESHCTL_CITADEL_* override."""

    model_config = SettingsConfigDict(env_prefix="MESHCTL_CITADEL_", frozen=True)

    trust_domain: str = Field("cluster.local", description="SPIFFE trust domain (Istio's default)")
    ca_dir: Path = Field(description="Citadel's state: self-signed roots and the token-signing key (0700)")
    cacerts_dir: Path | None = Field(
        None, description="plugged-in CA: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem (Istio's cacerts); "
        "when set, no self-signed root is created")
    external_roots: bool = Field(
        False, description="the roots come from elsewhere (a cluster's Secrets, `citadel.kube_store`), handed "
        "over by the composition root before the CA serves; until then it holds a throwaway in-memory root and "
        "writes none to ca_dir")
    key_algorithm: KeyAlgorithm = Field(KeyAlgorithm.ECDSA_P256, description="key type of self-signed roots")
    root_ttl: timedelta = Field(timedelta(days=3650), description="lifetime of a self-signed root")
    workload_cert_ttl: timedelta = Field(timedelta(hours=24), description="TTL when a CSR asks for none")
    max_workload_cert_ttl: timedelta = Field(timedelta(days=90), description="longer requests are capped to this")
    expiry_warn_fraction: float = Field(
        0.2, gt=0, lt=1, description="warn when less than this fraction of the root's lifetime remains")
    rotate_roots: bool = Field(True, description="rotate a self-signed root on its own when it nears expiry")
    root_propagation: timedelta = Field(
        timedelta(hours=24), description="time a new root is trusted before it signs (bundle propagation)")
    check_interval: timedelta = Field(timedelta(minutes=1), description="expiry/rotation/reload check period")
    token_audience: str = Field("istio-ca", description="audience of workload credentials")
    token_issuer: str = Field("meshctl-citadel", description="issuer of workload credentials")
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(15012, ge=0, le=65535, description="CSR service over TLS; 0 picks a free port")
    server_dns_names: tuple[str, ...] = Field(
        istiod_dns_names("istio-system"),
        description="DNS SANs of the CSR server's certificate (`meshctl up` on a cluster: istiod_dns_names of "
        "--mesh-namespace)")

    @model_validator(mode="after")
    def _one_ca_source(self) -> CitadelSettings:
        if self.workload_cert_ttl > self.max_workload_cert_ttl:
            raise ValueError(f"workload_cert_ttl {self.workload_cert_ttl} exceeds max_workload_cert_ttl "
                             f"{self.max_workload_cert_ttl}")
        return self
