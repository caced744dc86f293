"""The CSR service's request logic, without gRPC: authenticate, check, sign, count, log.

`server` maps its exceptions to gRPC status codes (UNAUTHENTICATED, PERMISSION_DENIED,
INVALID_ARGUMENT). Logs name the peer, the authenticated identity and the reason, never the token
or a key. Runs on the event loop; a request costs one authentication, one CSR signature check and
one CA signature (sub-millisecond with ECDSA keys, a few ms with an RSA-4096 CA key).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from citadel.authn import Authenticator, Credentials, authenticate
from citadel.authority import CertificateAuthority
from citadel.errors import AuthenticationError, CSRError, IdentityMismatchError, SigningError
from citadel.keys import cert_pem
from citadel.metrics import CitadelMetrics

log = logging.getLogger(__name__)


class CSRService:
    """Istio's CreateCertificate semantics over a `CertificateAuthority`."""

    def __init__(self, ca: CertificateAuthority, authenticators: Sequence[Authenticator],
                 metrics: CitadelMetrics) -> None:
        self.ca = ca
        self.authenticators = list(authenticators)
        self.metrics = metrics

    async def create_certificate(self, csr_pem: str, validity_seconds: int, credentials: Credentials) -> list[str]:
        """PEM certificates (leaf first, roots last), or AuthenticationError / CSRError."""
        self.metrics.csr.inc()
        try:
            caller = await authenticate(self.authenticators, credentials)
        except AuthenticationError as exc:
            self.metrics.authn_failures.inc()
            log.warning("citadel: CSR from %s rejected: authentication failed: %s", credentials.peer, exc)
            raise
        try:
            issued = self.ca.sign_csr(csr_pem, validity_seconds, caller.identity)
        except IdentityMismatchError as exc:
            self.metrics.sign_errors.labels(error="IDENTITY_MISMATCH").inc()
            log.warning("citadel: CSR from %s (%s) rejected: %s", credentials.peer, caller.identity, exc)
            raise
        except CSRError as exc:
            self.metrics.csr_parse_errors.inc()
            log.warning("citadel: CSR from %s (%s) rejected: %s", credentials.peer, caller.identity, exc)
            raise
        except Exception as exc:  # a CA fault, not the caller's: counted, logged with context, INTERNAL
            self.metrics.sign_errors.labels(error="CERT_GEN_ERROR").inc()
            log.exception("citadel: signing a CSR from %s (%s) failed", credentials.peer, caller.identity)
            raise SigningError(str(exc)) from exc
        self.metrics.success.inc()
        log.info("citadel: issued %s to %s (via %s), expires %s", caller.identity, credentials.peer,
                 caller.authenticator, issued.leaf.not_valid_after_utc.isoformat())
        return [cert_pem(c) for c in issued.chain]
