"""PeerAuthentication (``security.istio.io`` v1/v1beta1): what a workload's sidecar accepts inbound.

``mtls.mode`` is STRICT (mutual TLS only), PERMISSIVE (mutual TLS or plaintext on the same
port), DISABLE (plaintext only) or UNSET (inherit from the next level up). A policy in the root
namespace without a selector is mesh-wide, one in another namespace without a selector covers
that namespace, one with ``selector.matchLabels`` covers the workloads it selects and may set
``portLevelMtls`` per workload port. How the levels combine is `pilot.model.mtls`; the checks
here are Istio's ``ValidatePeerAuthentication``, in its words.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Literal

from pilot.api.base import ApiObject, IstioModel
from pilot.api.errors import FieldIssue
from pilot.api.security_common import WorkloadSelector


class MutualTLSMode(StrEnum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


class MutualTLS(IstioModel):
    mode: MutualTLSMode = MutualTLSMode.UNSET


class PeerAuthenticationSpec(IstioModel):
    selector: WorkloadSelector | None = None
    mtls: MutualTLS | None = None
    # Keys are workload (target) ports; YAML gives them as strings, pydantic reads them as numbers.
    port_level_mtls: dict[int, MutualTLS] | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        ports: Mapping[int, MutualTLS] | None = self.port_level_mtls
        if ports and (self.selector is None or not self.selector.match_labels):
            yield FieldIssue(f"{path}.portLevelMtls", "mesh/namespace peer authentication cannot have port level mTLS")
        if ports is not None and not ports:
            yield FieldIssue(f"{path}.portLevelMtls", "port level mTLS, if defined, must have at least one element")
        for port in sorted(ports or {}):
            if not 1 <= port <= 65535:
                yield FieldIssue(f"{path}.portLevelMtls.{port}", "port must be in range 1..65535")


class PeerAuthentication(ApiObject):
    KIND = "PeerAuthentication"
    kind: Literal["PeerAuthentication"]
    spec: PeerAuthenticationSpec = PeerAuthenticationSpec()
