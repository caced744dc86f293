"""The CA on disk: a self-signed CA directory with its rotation state, or a plugged-in `cacerts` directory.

Self-signed layout (created on first start, directory 0700):

    <ca_dir>/state.json              phase, active root id, trusted root ids, changed_at
    <ca_dir>/roots/<id>.cert.pem     each root certificate (0644)
    <ca_dir>/roots/<id>.key.pem      each root key (0600, written 0600 from the first byte)
    <ca_dir>/root-cert.pem           the current trust bundle, for operators and `openssl verify`
    <ca_dir>/token-signing-key.pem   Ed25519 key signing workload credentials (0600)

`save` writes new roots first, then swaps `state.json` atomically, then the exported bundle, then
deletes retired roots: a crash at any point leaves a loadable directory.

Plugged-in layout, as Istio's `cacerts` secret: `ca-cert.pem` (signing certificate), `ca-key.pem`
(its key), `root-cert.pem` (the root, or several during a rotation), `cert-chain.pem` (the chain
from `ca-cert.pem` up to the root; empty when `ca-cert.pem` is the root). Read-only here; the
operator rotates by replacing the files and the authority reloads them.

Only the loading thread touches these files; keys are never logged (errors name files only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from citadel.ca import DEFAULT_ROOT_TTL, CABundle, check_ca_bundle, create_root
from citadel.errors import CAConfigError
from citadel.files import PUBLIC_MODE, ensure_private_dir, write_file_atomic, write_secret_file
from citadel.keys import (
    KeyAlgorithm,
    cert_pem,
    certs_pem,
    fingerprint,
    generate_key,
    load_certs,
    load_signing_key,
    private_key_pem,
)
from citadel.rotation import Phase, Root, RootState, initial_state

STATE_FILE = "state.json"
BUNDLE_FILE = "root-cert.pem"
TOKEN_KEY_FILE = "token-signing-key.pem"
CACERTS_FILES = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")


def new_root(algorithm: KeyAlgorithm, trust_domain: str, now: datetime, ttl: timedelta = DEFAULT_ROOT_TTL) -> Root:
    """A fresh root (key + self-signed certificate); RSA-4096 takes about a second."""
    key = generate_key(algorithm)
    return Root(create_root(key, trust_domain, ttl, now), key)


class SelfSignedStore:
    """Persists a self-signed CA's `RootState` in a directory (see the module docstring)."""

    def __init__(self, ca_dir: Path) -> None:
        self.ca_dir = ca_dir
        self.roots_dir = ca_dir / "roots"

    def load_or_create(self, algorithm: KeyAlgorithm, trust_domain: str, now: datetime,
                       root_ttl: timedelta = DEFAULT_ROOT_TTL) -> tuple[RootState, bool]:
        """The persisted state, or a new root created and saved; the flag says whether it was created."""
        if (self.ca_dir / STATE_FILE).exists():
            return self.load(), False
        state = initial_state(new_root(algorithm, trust_domain, now, root_ttl), now)
        self.save(state)
        return state, True

    def load(self) -> RootState:
        """Read `state.json` and the roots it names; a missing or bad file raises CAConfigError naming it."""
        path = self.ca_dir / STATE_FILE
        try:
            doc = json.loads(path.read_text())
            phase = Phase(doc["phase"])
            active_id = str(doc["active"])
            trusted_ids = [str(i) for i in doc["trusted"]]
            changed_at = datetime.fromisoformat(doc["changed_at"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CAConfigError(f"{path}: unreadable CA state ({type(exc).__name__}: {exc})") from None
        roots = {i: self._load_root(i) for i in trusted_ids}
        if active_id not in roots:
            raise CAConfigError(f"{path}: active root {active_id} is not among the trusted roots {trusted_ids}")
        return RootState(phase, roots[active_id], tuple(roots[i] for i in trusted_ids), changed_at)

    def _load_root(self, root_id: str) -> Root:
        cert_path = self.roots_dir / f"{root_id}.cert.pem"
        key_path = self.roots_dir / f"{root_id}.key.pem"
        try:
            certs = load_certs(cert_path.read_bytes(), str(cert_path))
            key = load_signing_key(key_path.read_bytes(), str(key_path))
        except OSError as exc:
            raise CAConfigError(f"{exc.filename}: cannot read ({exc.strerror})") from None
        if len(certs) != 1 or fingerprint(certs[0])[:16] != root_id:
            raise CAConfigError(f"{cert_path}: does not hold exactly the root {root_id}")
        return Root(certs[0], key)

    def save(self, state: RootState) -> None:
        """Persist `state` crash-safely: new roots, then state.json, then the bundle, then deletions."""
        ensure_private_dir(self.ca_dir)
        ensure_private_dir(self.roots_dir)
        for root in state.trusted:
            key_path = self.roots_dir / f"{root.id}.key.pem"
            if not key_path.exists():
                write_secret_file(key_path, private_key_pem(root.key))
                write_file_atomic(self.roots_dir / f"{root.id}.cert.pem", cert_pem(root.cert).encode(), PUBLIC_MODE)
        doc = {"phase": state.phase.value, "active": state.active.id, "trusted": [r.id for r in state.trusted],
               "changed_at": state.changed_at.isoformat()}
        write_file_atomic(self.ca_dir / STATE_FILE, (json.dumps(doc, indent=2) + "\n").encode(), PUBLIC_MODE)
        write_file_atomic(self.ca_dir / BUNDLE_FILE, certs_pem([r.cert for r in state.trusted]).encode(),
                          PUBLIC_MODE)
        keep = {r.id for r in state.trusted}
        for path in self.roots_dir.glob("*.pem"):
            if path.name.split(".", 1)[0] not in keep:
                path.unlink(missing_ok=True)

    def load_or_create_token_key(self) -> ed25519.Ed25519PrivateKey:
        """The Ed25519 key that signs workload credentials, created (0600) on first use."""
        path = self.ca_dir / TOKEN_KEY_FILE
        if path.exists():
            try:
                key = load_pem_private_key(path.read_bytes(), password=None)
            except (OSError, ValueError, TypeError) as exc:
                raise CAConfigError(f"{path}: unreadable token-signing key ({type(exc).__name__})") from None
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise CAConfigError(f"{path}: not an Ed25519 private key")
            return key
        ensure_private_dir(self.ca_dir)
        key = ed25519.Ed25519PrivateKey.generate()
        write_secret_file(path, private_key_pem(key))
        return key


def load_cacerts(cacerts_dir: Path, now: datetime) -> CABundle:
    """Load and check a plugged-in CA laid out as Istio's `cacerts` secret (see the module docstring)."""
    files: dict[str, bytes] = {}
    for name in CACERTS_FILES:
        path = cacerts_dir / name
        try:
            files[name] = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CAConfigError(f"{path}: cannot read ({exc.strerror})") from None
    return cacerts_bundle(files, str(cacerts_dir), now, separator="/")


def cacerts_bundle(files: Mapping[str, bytes], source: str, now: datetime, *, separator: str = ":") -> CABundle:
    """Check a plugged-in CA given as Istio's `cacerts` entries (file name -> content), from a
    directory or a Secret's data; `source` + `separator` + entry name it in errors."""
    def read(name: str, required: bool = True) -> bytes:
        if name not in files and required:
            raise CAConfigError(f"{source}{separator}{name}: missing (a plugged-in CA needs "
                                f"{', '.join(CACERTS_FILES[:3])})")
        return files.get(name, b"")

    def where(name: str) -> str:
        return f"{source}{separator}{name}"

    signing = load_certs(read("ca-cert.pem"), where("ca-cert.pem"))
    if len(signing) != 1:
        raise CAConfigError(f"{where('ca-cert.pem')}: must hold exactly one certificate, found {len(signing)}")
    key = load_signing_key(read("ca-key.pem"), where("ca-key.pem"))
    roots = load_certs(read("root-cert.pem"), where("root-cert.pem"))
    chain = load_certs(read("cert-chain.pem", required=False), where("cert-chain.pem"))
    root_fps = {fingerprint(r) for r in roots}
    intermediates = [c for c in chain if fingerprint(c) not in root_fps]  # Istio's tooling may append the root
    if not intermediates and fingerprint(signing[0]) not in root_fps:
        intermediates = [signing[0]]
    bundle = CABundle(signing_key=key, signing_cert=signing[0], intermediates=tuple(intermediates), roots=tuple(roots))
    check_ca_bundle(bundle, source, now)
    return bundle
