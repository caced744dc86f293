"""The running CA: holds the current signing bundle and swaps it on rotation or reload.

Concurrency: one `CertificateAuthority` per process, used from the event loop only. Readers take
`self.bundle` once per request (an attribute read, so a request signs with one consistent bundle);
rotation steps and reloads build the new state first, persist it, then replace the attribute.
Nothing restarts: the CSR server reads the new bundle on its next request.

Two sources: a self-signed CA directory (created on first start, rotated by `rotation`) or a
plugged-in `cacerts` directory (rotated by the operator replacing files, then `reload`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography import x509

from citadel import rotation
from citadel.ca import CABundle, WorkloadCertPolicy, describe, sign_workload
from citadel.csr import check_csr_identity, csr_public_key, parse_csr
from citadel.errors import CAConfigError
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, fingerprint
from citadel.metrics import CitadelMetrics
from citadel.store import SelfSignedStore, load_cacerts, new_root

log = logging.getLogger(__name__)

DEFAULT_WARN_FRACTION = 0.2


def utc_now() -> datetime:
    """The wall clock in UTC (the default clock; tests pass their own)."""
    return datetime.now(UTC)


def expiry_warning(cert: x509.Certificate, what: str, now: datetime, fraction: float) -> str | None:
    """A warning when less than `fraction` of `cert`'s lifetime remains (or it expired), else None."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    remaining = cert.not_valid_after_utc - now
    if remaining <= timedelta(0):
        return f"{what} has EXPIRED: {describe(cert)}"
    if remaining < lifetime * fraction:
        return f"{what} expires in {remaining} (less than {fraction:.0%} of its lifetime left): {describe(cert)}"
    return None


class RootStore(Protocol):
    """Where a self-signed CA's roots persist: a directory (`SelfSignedStore`) or a Kubernetes Secret
    (`citadel.kube_store.KubeRootStore`). `save` raises CAConfigError when the write is refused."""

    def save(self, state: rotation.RootState) -> None: ...


@dataclass(frozen=True)
class Issued:
    """A signed workload certificate and the chain to return (leaf first, roots last)."""

    leaf: x509.Certificate
    chain: list[x509.Certificate]


class CertificateAuthority:
    """Signs workload CSRs with the current bundle; rotates (self-signed) or reloads (plugged-in)."""

    def __init__(self, bundle: CABundle, policy: WorkloadCertPolicy, *, trust_domain: str,
                 metrics: CitadelMetrics | None = None, clock: Callable[[], datetime] = utc_now,
                 store: RootStore | None = None, state: rotation.RootState | None = None,
                 cacerts_dir: Path | None = None, warn_fraction: float = DEFAULT_WARN_FRACTION) -> None:
        self.bundle = bundle
        self.policy = policy
        self.trust_domain = trust_domain
        self.metrics = metrics
        self.clock = clock
        self.store = store
        self.state = state
        self.cacerts_dir = cacerts_dir
        self.warn_fraction = warn_fraction
        self._on_change: list[Callable[[CABundle], None]] = []
        self._publish(bundle)

    @classmethod
    def self_signed(cls, ca_dir: Path, policy: WorkloadCertPolicy, *, trust_domain: str,
                    algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256, root_ttl: timedelta | None = None,
                    metrics: CitadelMetrics | None = None, clock: Callable[[], datetime] = utc_now,
                    warn_fraction: float = DEFAULT_WARN_FRACTION) -> CertificateAuthority:
        """Load the CA directory, creating a root on first start."""
        store = SelfSignedStore(ca_dir)
        kwargs = {"root_ttl": root_ttl} if root_ttl is not None else {}
        state, created = store.load_or_create(algorithm, trust_domain, clock(), **kwargs)
        log.info("citadel: %s self-signed CA in %s, root %s", "created" if created else "loaded", ca_dir,
                 describe(state.active.cert))
        return cls(state.bundle, policy, trust_domain=trust_domain, metrics=metrics, clock=clock, store=store,
                   state=state, warn_fraction=warn_fraction)

    @classmethod
    def plugged(cls, cacerts_dir: Path, policy: WorkloadCertPolicy, *, trust_domain: str,
                metrics: CitadelMetrics | None = None, clock: Callable[[], datetime] = utc_now,
                warn_fraction: float = DEFAULT_WARN_FRACTION) -> CertificateAuthority:
        """Use a plugged-in CA from an Istio `cacerts` layout."""
        bundle = load_cacerts(cacerts_dir, clock())
        log.info("citadel: plugged-in CA from %s, signing with %s", cacerts_dir, describe(bundle.signing_cert))
        return cls(bundle, policy, trust_domain=trust_domain, metrics=metrics, clock=clock,
                   cacerts_dir=cacerts_dir, warn_fraction=warn_fraction)

    def on_change(self, callback: Callable[[CABundle], None]) -> None:
        """Call `callback(bundle)` after every bundle change (e.g. to re-issue a serving certificate)."""
        self._on_change.append(callback)

    def sign_csr(self, csr_pem: str, requested_seconds: int, caller: SpiffeId) -> Issued:
        """Check the CSR against `caller` and sign it (CSRError/IdentityMismatchError on refusal)."""
        csr = parse_csr(csr_pem)
        key = csr_public_key(csr)
        check_csr_identity(csr, caller)
        bundle = self.bundle
        leaf = sign_workload(bundle, key, caller, self.policy.effective_ttl(requested_seconds), self.clock(),
                             self.policy.backdate)
        return Issued(leaf, bundle.response_chain(leaf))

    def trust_bundle(self) -> tuple[x509.Certificate, ...]:
        """The roots relying parties must trust now (old and new during a rotation)."""
        return self.bundle.roots

    def check_expiry(self) -> list[str]:
        """Log (and return) warnings for the root and signing certificate nearing expiry."""
        now = self.clock()
        bundle = self.bundle
        found = [expiry_warning(bundle.issuing_root, "CA root certificate", now, self.warn_fraction)]
        if bundle.signing_cert is not bundle.issuing_root:
            found.append(expiry_warning(bundle.signing_cert, "CA signing certificate", now, self.warn_fraction))
        warnings = [w for w in found if w]
        for warning in warnings:
            log.warning("citadel: %s", warning)
        return warnings

    # --- self-signed root rotation ---------------------------------------------------------------

    def use_store(self, store: RootStore, state: rotation.RootState) -> None:
        """Serve and rotate the roots `state` kept in `store` from now on (e.g. the cluster's shared
        Secret instead of the state directory); replaces a plugged-in CA."""
        self.store, self.state, self.cacerts_dir = store, state, None
        self._publish(state.bundle)

    def adopt(self, state: rotation.RootState) -> bool:
        """Take roots another replica saved (not saved again); True if they differ from ours."""
        current = self.state
        if current is not None and _state_key(current) == _state_key(state):
            return False
        self.state = state
        self._publish(state.bundle)
        return True

    def use_bundle(self, bundle: CABundle) -> bool:
        """Sign with a plugged-in `bundle` given by the caller (e.g. Secret `cacerts`); True if it changed.
        No rotation here: the operator rotates a plugged-in CA."""
        self.store, self.state, self.cacerts_dir = None, None, None
        if _bundle_key(bundle) == _bundle_key(self.bundle):
            return False
        self._publish(bundle)
        return True

    def _require_state(self) -> tuple[RootStore, rotation.RootState]:
        if self.store is None or self.state is None:
            raise CAConfigError("root rotation is managed by the operator for a plugged-in CA (replace cacerts)")
        return self.store, self.state

    def _apply(self, new_state: rotation.RootState, step: str) -> None:
        store, _ = self._require_state()
        store.save(new_state)
        self.state = new_state
        self._publish(new_state.bundle)
        log.info("citadel: root rotation %s: phase %s, active root %s, trusted %s", step, new_state.phase,
                 new_state.active.id, [r.id for r in new_state.trusted])

    def introduce_root(self, algorithm: KeyAlgorithm | None = None, root_ttl: timedelta | None = None) -> None:
        """Create a new root and add it to the trust bundle (the current root keeps signing)."""
        _, state = self._require_state()
        now = self.clock()
        algo = algorithm or _algorithm_of(state.active)
        ttl = root_ttl or (state.active.cert.not_valid_after_utc - state.active.cert.not_valid_before_utc)
        self._apply(rotation.introduce(state, new_root(algo, self.trust_domain, now, ttl), now), "introduce")

    def activate_root(self) -> None:
        """New leaves are signed by the introduced root from now on."""
        _, state = self._require_state()
        self._apply(rotation.activate(state, self.clock()), "activate")

    def retire_root(self, *, force: bool = False) -> None:
        """Remove the old root from the bundle (refused while its leaves may be valid, unless forced)."""
        _, state = self._require_state()
        self._apply(rotation.retire(state, self.clock(), self.policy.max_ttl, force=force), "retire")

    def rotation_tick(self, policy: rotation.RotationPolicy) -> rotation.Action | None:
        """Perform the rotation step due now (see `rotation.next_action`); returns what it did."""
        if self.state is None:
            return None
        action = rotation.next_action(self.state, self.clock(), policy)
        if action is rotation.Action.INTRODUCE:
            self.introduce_root()
        elif action is rotation.Action.ACTIVATE:
            self.activate_root()
        elif action is rotation.Action.RETIRE:
            self.retire_root()
        return action

    # --- plugged-in reload --------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read a plugged-in `cacerts` directory; True if the bundle changed. A bad new set keeps the old."""
        if self.cacerts_dir is None:
            return False
        bundle = load_cacerts(self.cacerts_dir, self.clock())
        if _bundle_key(bundle) == _bundle_key(self.bundle):
            return False
        self._publish(bundle)
        log.info("citadel: reloaded plugged-in CA from %s, signing with %s", self.cacerts_dir,
                 describe(bundle.signing_cert))
        return True

    def _publish(self, bundle: CABundle) -> None:
        self.bundle = bundle
        if self.metrics is not None:
            self.metrics.record_expiry(bundle)
        for callback in self._on_change:
            callback(bundle)


def _state_key(state: rotation.RootState) -> tuple[str, ...]:
    return (state.phase.value, state.active.id, *(r.id for r in state.trusted))


def _bundle_key(bundle: CABundle) -> tuple[str, ...]:
    return tuple(fingerprint(c) for c in (bundle.signing_cert, *bundle.intermediates, *bundle.roots))


def _algorithm_of(root: rotation.Root) -> KeyAlgorithm:
    from cryptography.hazmat.primitives.asymmetric import rsa

    if isinstance(root.key, rsa.RSAPrivateKey):
        return KeyAlgorithm.RSA_4096 if root.key.key_size >= 4096 else KeyAlgorithm.RSA_2048
    return KeyAlgorithm.ECDSA_P256
