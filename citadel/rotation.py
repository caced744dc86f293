"""Root rotation as a pure state machine over the self-signed CA's roots.

Phases (each step returns a new frozen state; `store` persists it, `authority` swaps it in, so no
process restarts):

    STABLE      active=A, trusted=[A]          leaves signed by A
      │ introduce(B)
    INTRODUCED  active=A, trusted=[A, B]       workloads learn to trust B before anything is signed by it
      │ activate()
    ACTIVATED   active=B, trusted=[B, A]       new leaves signed by B; leaves of A remain valid
      │ retire()   (only once every leaf A signed has expired: activation + max workload TTL)
    STABLE      active=B, trusted=[B]

`next_action` decides the step due at a given time, so a periodic task (or a leader on Kubernetes)
can drive the rotation; an operator can also call the steps directly. Cost: nothing but comparisons;
the expensive part (a new key) happens in `introduce` callers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from cryptography import x509

from citadel.ca import CABundle, self_signed_bundle
from citadel.errors import RotationError
from citadel.keys import SigningKey, fingerprint


class Phase(StrEnum):
    """Where a rotation stands."""

    STABLE = "stable"
    INTRODUCED = "introduced"
    ACTIVATED = "activated"


@dataclass(frozen=True)
class Root:
    """A self-signed root and its key."""

    cert: x509.Certificate
    key: SigningKey

    @property
    def id(self) -> str:
        """Short, stable name (SHA-256 fingerprint prefix) used for files and logs."""
        return fingerprint(self.cert)[:16]


@dataclass(frozen=True)
class RootState:
    """The self-signed CA's roots: which one signs, which ones are trusted, and since when."""

    phase: Phase
    active: Root
    trusted: tuple[Root, ...]
    changed_at: datetime

    def __post_init__(self) -> None:
        ids = [r.id for r in self.trusted]
        if self.active.id not in ids:
            raise RotationError(f"active root {self.active.id} is not in the trust bundle {ids}")
        if len(set(ids)) != len(ids):
            raise RotationError(f"trust bundle lists a root twice: {ids}")
        if (self.phase is Phase.STABLE) != (len(ids) == 1):
            raise RotationError(f"phase {self.phase} does not fit a bundle of {len(ids)} roots")

    @property
    def bundle(self) -> CABundle:
        """The signing bundle: the active root signs, every trusted root is in the trust bundle."""
        return self_signed_bundle(self.active.key, self.active.cert, [r.cert for r in self.trusted])

    @property
    def other(self) -> Root | None:
        """The root that is trusted but not active (the new one, or the old one), if rotating."""
        rest = [r for r in self.trusted if r.id != self.active.id]
        return rest[0] if rest else None


def initial_state(root: Root, now: datetime) -> RootState:
    """A CA with a single root."""
    return RootState(Phase.STABLE, root, (root,), now)


def introduce(state: RootState, new_root: Root, now: datetime) -> RootState:
    """Add `new_root` to the trust bundle; the current root keeps signing."""
    if state.phase is not Phase.STABLE:
        raise RotationError(f"cannot introduce a root while a rotation is {state.phase}")
    return RootState(Phase.INTRODUCED, state.active, (state.active, new_root), now)


def activate(state: RootState, now: datetime) -> RootState:
    """Sign new leaves with the introduced root; the old root stays trusted."""
    new = state.other
    if state.phase is not Phase.INTRODUCED or new is None:
        raise RotationError(f"cannot activate a new root in phase {state.phase} (introduce one first)")
    return RootState(Phase.ACTIVATED, new, (new, state.active), now)


def retire(state: RootState, now: datetime, max_leaf_ttl: timedelta, *, force: bool = False) -> RootState:
    """Drop the old root once every leaf it signed has expired (or now, with `force`)."""
    if state.phase is not Phase.ACTIVATED:
        raise RotationError(f"cannot retire the old root in phase {state.phase} (activate the new one first)")
    safe_at = state.changed_at + max_leaf_ttl
    if now < safe_at and not force:
        raise RotationError(f"old root {state.other.id if state.other else '?'} may still have valid leaves "
                            f"until {safe_at.isoformat()}; retire after that or force")
    return replace(state, phase=Phase.STABLE, trusted=(state.active,), changed_at=now)


@dataclass(frozen=True)
class RotationPolicy:
    """When rotation steps happen on their own.

    `rotate_at_fraction`: start when less than this fraction of the active root's lifetime remains
    (Istio's self-signed root grace period is 20%). `propagation`: how long the new root is only
    trusted before it signs (time for every workload to receive the new bundle; at least one leaf
    renewal). `max_leaf_ttl`: the CA's maximum workload TTL, after which the old root's leaves are gone.
    """

    rotate_at_fraction: float = 0.2
    propagation: timedelta = timedelta(hours=24)
    max_leaf_ttl: timedelta = timedelta(days=90)


class Action(StrEnum):
    """The rotation step `next_action` says is due."""

    INTRODUCE = "introduce"
    ACTIVATE = "activate"
    RETIRE = "retire"


def next_action(state: RootState, now: datetime, policy: RotationPolicy) -> Action | None:
    """The step due at `now`, or None."""
    if state.phase is Phase.INTRODUCED:
        return Action.ACTIVATE if now >= state.changed_at + policy.propagation else None
    if state.phase is Phase.ACTIVATED:
        return Action.RETIRE if now >= state.changed_at + policy.max_leaf_ttl else None
    cert = state.active.cert
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    remaining = cert.not_valid_after_utc - now
    return Action.INTRODUCE if remaining < lifetime * policy.rotate_at_fraction else None
