"""Citadel's exceptions, one tree so callers can catch what they can handle.

    CitadelError                 base of everything raised on purpose here
    ├── CAConfigError            CA files or settings are unusable (names the file and the reason)
    ├── RotationError            a root-rotation step is not allowed in the current phase/time
    ├── AuthenticationError      a caller's credential is missing, malformed, forged or expired
    ├── CSRError                 a CSR cannot be signed for this caller
    │   └── IdentityMismatchError  the CSR asks for an identity the caller does not hold
    └── SigningError             the CA failed to sign an acceptable CSR (its own fault)

Messages never contain private keys or tokens; they name the file, field or claim and the reason.
"""

from __future__ import annotations


class CitadelError(Exception):
    """Base class of Citadel's deliberate errors."""


class CAConfigError(CitadelError):
    """A CA file or setting cannot be used; the message names the file and the reason."""


class RotationError(CitadelError):
    """A root-rotation step was asked for in a phase (or at a time) where it is unsafe."""


class AuthenticationError(CitadelError):
    """The caller's credential is missing, malformed, forged, expired or meant for someone else."""


class CSRError(CitadelError):
    """A certificate signing request is malformed or cannot be signed (bad signature, key type...)."""


class IdentityMismatchError(CSRError):
    """The CSR requests a SAN other than the authenticated caller's single SPIFFE identity."""


class SigningError(CitadelError):
    """The CA failed to sign an acceptable CSR; its own fault, answered INTERNAL and counted."""
