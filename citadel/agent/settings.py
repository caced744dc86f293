"""The workload agent's settings, built once (CLI flags, `meshctl proxy run`, tests) and passed down."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from citadel.keys import KeyAlgorithm

# A Unix socket path must fit `sockaddr_un.sun_path` (108 bytes on Linux, with the NUL).
MAX_SOCKET_PATH = 107


class AgentSettings(BaseSettings):
    """One workload's agent. Environment variables MESHCTL_AGENT_* override (only when built by the CLI)."""

    model_config = SettingsConfigDict(env_prefix="MESHCTL_AGENT_", frozen=True)

    trust_domain: str = Field("cluster.local", description="SPIFFE trust domain (Istio's default)")
    namespace: str = Field(description="the workload's namespace (must match its token)")
    service_account: str = Field(description="the workload's service account (must match its token)")
    ca_address: str = Field("127.0.0.1:15012", description="CSR service host:port (gRPC over TLS)")
    ca_server_name: str | None = Field(
        None, description="TLS name to check on the CA's certificate when it differs from the address host")
    ca_root_file: Path = Field(description="PEM bundle of the mesh root(s) the CA's certificate chains to")
    token_file: Path = Field(description="the per-workload credential (0600) the control plane issued")
    sds_socket: Path = Field(description="Unix socket the agent serves SDS on, for its Envoy")
    key_algorithm: KeyAlgorithm = Field(KeyAlgorithm.ECDSA_P256, description="workload key type")
    cert_ttl: timedelta = Field(timedelta(0), description="TTL to ask for; 0 takes the CA's default (24 h)")
    renew_fraction: float = Field(0.5, gt=0, lt=1, description="renew after this fraction of the remaining lifetime")
    renew_jitter: float = Field(0.05, ge=0, lt=0.5, description="renewal time varies by +/- this fraction")
    backoff_initial: timedelta = Field(timedelta(seconds=1), description="first retry delay after a failure")
    backoff_max: timedelta = Field(timedelta(seconds=60), description="retry delays double up to this")
    ca_timeout: timedelta = Field(timedelta(seconds=10), description="deadline of one CreateCertificate call")
    credential_dir: Path | None = Field(
        None, description="a gateway's secret store root: serves <dir>/<namespace>/<name>/ as kubernetes://<name>")
    credential_poll: timedelta = Field(
        timedelta(seconds=1), description="how often the credential directory is checked for changed files")

    @model_validator(mode="after")
    def _check(self) -> AgentSettings:
        if len(str(self.sds_socket).encode()) > MAX_SOCKET_PATH:
            raise ValueError(f"sds_socket {str(self.sds_socket)!r}: longer than {MAX_SOCKET_PATH} bytes, "
                             "the limit of a Unix socket path")
        if self.backoff_initial <= timedelta(0) or self.backoff_max < self.backoff_initial:
            raise ValueError(f"backoff_initial {self.backoff_initial} must be positive and at most "
                             f"backoff_max {self.backoff_max}")
        if self.credential_poll <= timedelta(0):
            raise ValueError(f"credential_poll {self.credential_poll} must be positive")
        if self.cert_ttl < timedelta(0):
            raise ValueError(f"cert_ttl {self.cert_ttl} must not be negative")
        return self
