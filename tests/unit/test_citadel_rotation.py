"""Root rotation without restarts: the pure state machine, its persistence, and the running CA."""

from __future__ import annotations

import json
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from citadel import rotation
from citadel.authority import CertificateAuthority
from citadel.ca import WorkloadCertPolicy
from citadel.csr import build_csr
from citadel.errors import CAConfigError, RotationError
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, generate_key
from citadel.rotation import Action, Phase, RotationPolicy
from citadel.store import SelfSignedStore, new_root
from citadel.testing import Clock, write_cacerts
from tests.unit.test_citadel_ca import verify_with_cryptography, verify_with_openssl

TD = "cluster.local"
ALICE = SpiffeId(TD, "default", "alice")
POLICY = WorkloadCertPolicy(default_ttl=timedelta(hours=1), max_ttl=timedelta(hours=2))


def leaf_chain(ca: CertificateAuthority) -> list[x509.Certificate]:
    return ca.sign_csr(build_csr(generate_key(KeyAlgorithm.ECDSA_P256), []), 0, ALICE).chain


def test_state_machine_steps_and_refusals() -> None:
    clock = Clock()
    a = new_root(KeyAlgorithm.ECDSA_P256, TD, clock.now)
    b = new_root(KeyAlgorithm.ECDSA_P256, TD, clock.now)
    s0 = rotation.initial_state(a, clock.now)
    with pytest.raises(RotationError, match="introduce one first"):
        rotation.activate(s0, clock.now)
    with pytest.raises(RotationError, match="activate the new one first"):
        rotation.retire(s0, clock.now, timedelta(hours=2))
    s1 = rotation.introduce(s0, b, clock.now)
    assert (s1.phase, s1.active.id, [r.id for r in s1.trusted]) == (Phase.INTRODUCED, a.id, [a.id, b.id])
    with pytest.raises(RotationError, match="while a rotation is introduced"):
        rotation.introduce(s1, b, clock.now)
    s2 = rotation.activate(s1, clock.now)
    assert (s2.phase, s2.active.id, [r.id for r in s2.trusted]) == (Phase.ACTIVATED, b.id, [b.id, a.id])
    with pytest.raises(RotationError, match="may still have valid leaves"):
        rotation.retire(s2, clock.now + timedelta(hours=1), timedelta(hours=2))
    s3 = rotation.retire(s2, clock.now + timedelta(hours=2), timedelta(hours=2))
    assert (s3.phase, s3.active.id, [r.id for r in s3.trusted]) == (Phase.STABLE, b.id, [b.id])
    forced = rotation.retire(s2, clock.now, timedelta(hours=2), force=True)
    assert [r.id for r in forced.trusted] == [b.id]


def test_next_action_drives_a_full_rotation() -> None:
    clock = Clock()
    root = new_root(KeyAlgorithm.ECDSA_P256, TD, clock.now, ttl=timedelta(days=100))
    state = rotation.initial_state(root, clock.now)
    policy = RotationPolicy(rotate_at_fraction=0.2, propagation=timedelta(hours=24), max_leaf_ttl=timedelta(hours=2))
    assert rotation.next_action(state, clock.now + timedelta(days=79), policy) is None
    assert rotation.next_action(state, clock.now + timedelta(days=81), policy) is Action.INTRODUCE
    state = rotation.introduce(state, new_root(KeyAlgorithm.ECDSA_P256, TD, clock.now), clock.now)
    assert rotation.next_action(state, clock.now + timedelta(hours=23), policy) is None
    assert rotation.next_action(state, clock.now + timedelta(hours=24), policy) is Action.ACTIVATE
    state = rotation.activate(state, clock.now)
    assert rotation.next_action(state, clock.now + timedelta(hours=1), policy) is None
    assert rotation.next_action(state, clock.now + timedelta(hours=2), policy) is Action.RETIRE


def test_rotation_in_a_running_ca_with_persistence(tmp_path: Path) -> None:
    clock = Clock()
    ca_dir = tmp_path / "ca"
    ca = CertificateAuthority.self_signed(ca_dir, POLICY, trust_domain=TD, clock=clock)
    old_root = ca.bundle.roots[0]
    old_chain = leaf_chain(ca)

    ca.introduce_root()
    assert len(ca.trust_bundle()) == 2 and ca.trust_bundle()[0] == old_root
    new_root_cert = ca.trust_bundle()[1]
    introduced_chain = leaf_chain(ca)
    assert introduced_chain[1] == old_root  # still signed by the old root while the new one propagates
    assert introduced_chain[-1] == new_root_cert  # the bundle rides at the end of the chain

    ca.activate_root()
    assert set(ca.trust_bundle()) == {old_root, new_root_cert}
    new_chain = leaf_chain(ca)
    assert new_chain[0].issuer == new_root_cert.subject
    bundle = list(ca.trust_bundle())
    # both generations verify against the bundle carrying both roots
    verify_with_cryptography(new_chain, bundle, clock.now)
    verify_with_cryptography(old_chain, bundle, clock.now)
    verify_with_openssl(tmp_path, new_chain, [new_root_cert])
    exported = x509.load_pem_x509_certificates((ca_dir / "root-cert.pem").read_bytes())
    assert set(exported) == {old_root, new_root_cert}

    # the state survives a restart mid-rotation
    reloaded = CertificateAuthority.self_signed(ca_dir, POLICY, trust_domain=TD, clock=clock)
    assert reloaded.state is not None and reloaded.state.phase is Phase.ACTIVATED
    assert reloaded.bundle.signing_cert == new_root_cert

    with pytest.raises(RotationError, match="may still have valid leaves"):
        ca.retire_root()
    clock.advance(POLICY.max_ttl)
    ca.retire_root()
    assert ca.trust_bundle() == (new_root_cert,)
    assert json.loads((ca_dir / "state.json").read_text())["phase"] == "stable"
    keys = list((ca_dir / "roots").glob("*.key.pem"))
    assert len(keys) == 1 and stat.S_IMODE(keys[0].stat().st_mode) == 0o600
    assert len(list((ca_dir / "roots").glob("*.cert.pem"))) == 1
    assert x509.load_pem_x509_certificates((ca_dir / "root-cert.pem").read_bytes()) == [new_root_cert]
    assert SelfSignedStore(ca_dir).load().active.cert == new_root_cert


def test_rotation_tick_follows_the_policy(tmp_path: Path) -> None:
    clock = Clock()
    ca = CertificateAuthority.self_signed(tmp_path / "ca", POLICY, trust_domain=TD, clock=clock,
                                          root_ttl=timedelta(days=10))
    seen: list[int] = []
    ca.on_change(lambda bundle: seen.append(len(bundle.roots)))
    policy = RotationPolicy(0.2, timedelta(hours=1), POLICY.max_ttl)
    assert ca.rotation_tick(policy) is None
    clock.advance(timedelta(days=8, hours=1))
    assert ca.rotation_tick(policy) is Action.INTRODUCE
    clock.advance(timedelta(hours=1))
    assert ca.rotation_tick(policy) is Action.ACTIVATE
    clock.advance(POLICY.max_ttl)
    assert ca.rotation_tick(policy) is Action.RETIRE
    assert seen == [2, 2, 1]
    new_root_cert = ca.trust_bundle()[0]
    assert new_root_cert.not_valid_after_utc - clock.now > timedelta(days=9)  # the new root has a fresh lifetime


def test_plugged_in_ca_is_rotated_by_the_operator(tmp_path: Path) -> None:
    write_cacerts(tmp_path / "cacerts")
    ca = CertificateAuthority.plugged(tmp_path / "cacerts", POLICY, trust_domain=TD, clock=Clock())
    with pytest.raises(CAConfigError, match="managed by the operator"):
        ca.introduce_root()
    assert ca.reload() is False
    replacement = write_cacerts(tmp_path / "cacerts")
    assert ca.reload() is True
    assert leaf_chain(ca)[-1] == replacement.root
    (tmp_path / "cacerts" / "ca-key.pem").write_text("garbage")
    with pytest.raises(CAConfigError, match=r"ca-key\.pem"):
        ca.reload()
    assert leaf_chain(ca)[-1] == replacement.root  # a bad new set keeps the last good CA signing
