"""SPIFFE workload identities as Istio spells them: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

Pure values; parsing is strict (one form only) because an identity is what authorization trusts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# DNS-label-ish: what Kubernetes allows for namespaces and service accounts (subdomain for SAs).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
SPIFFE_SCHEME = "spiffe://"


def _check(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not value or len(value) > 253 or not pattern.match(value):
        raise ValueError(f"{what} {value!r} is not a valid name (lowercase letters, digits, '-', '.'; max 253)")
    return value


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A workload identity: trust domain, namespace and service account."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        _check(self.trust_domain, _TRUST_DOMAIN, "trust domain")
        _check(self.namespace, _NAME, "namespace")
        _check(self.service_account, _NAME, "service account")

    @property
    def uri(self) -> str:
        """The URI SAN carried by workload certificates."""
        return f"{SPIFFE_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse `spiffe://td/ns/<ns>/sa/<sa>`; any other shape raises ValueError naming the URI."""
        if not uri.startswith(SPIFFE_SCHEME):
            raise ValueError(f"identity {uri!r} is not a spiffe:// URI")
        parts = uri[len(SPIFFE_SCHEME):].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise ValueError(f"identity {uri!r} is not of the form spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
        return cls(parts[0], parts[2], parts[4])
