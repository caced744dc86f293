"""Mesh security for the local mesh: Citadel beside pilot, on one authenticated port, and workload credentials.

meshctl is the composition root: pilot imports no CA code, so this module hands pilot a
`SecureServing` built from Citadel (the SSL context of port 15012 with a server certificate from
the mesh CA, the client-certificate -> identity hook, and the CSR service's gRPC handler), and
keeps the per-workload credentials that `meshctl proxy run` gives its workload agent.

State directory (default `$XDG_STATE_HOME/meshctl`, i.e. `~/.local/state/meshctl`; 0700):

    ca/                     Citadel's CA directory (self-signed roots, token-signing key; see citadel.store)
    root-cert.pem           the current trust bundle (0644), what agents trust the CA's port with
    tokens/<ns>/<name>.token one credential per WorkloadEntry (0600, in 0700 directories)
    secrets/<ns>/<name>/    Gateway credentialName secrets (tls.crt, tls.key, ca.crt), written by the user

Tokens: `meshctl up` issues a token for every WorkloadEntry's namespace and service account
(24 h, signed by the control plane; see `citadel.tokens`), re-issues it at half its lifetime or
when the entry's service account changes, and deletes it when the entry goes. Whoever can read a
token file can obtain that workload's certificate, so the files are as private as the CA key:
readable by the user running the mesh only. One `meshctl up` per state directory.

Concurrency: everything runs on the caller's event loop; the SSL context is asked for per TLS
connection (cheap unless the server certificate was re-issued); `keep_tokens` is one guarded
task that wakes on config changes and every `TOKEN_CHECK`. Cost: a token is one Ed25519
signature and one fsync'd file; a config change touches only new or changed WorkloadEntries.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from prometheus_client import CollectorRegistry

from citadel.app import Citadel
from citadel.ca import CABundle
from citadel.files import PUBLIC_MODE, ensure_private_dir, write_file_atomic, write_secret_file
from citadel.identity import SpiffeId
from citadel.keys import certs_pem
from citadel.server import make_handler
from citadel.settings import CitadelSettings
from pilot.xds.peers import PeerIdentity, PeerIdentityHook, PeerUnauthenticatedError
from pilot.xds.server import SecureServing

log = logging.getLogger(__name__)

DEFAULT_TRUST_DOMAIN = "cluster.local"
TOKEN_TTL = timedelta(hours=24)
TOKEN_CHECK = 300.0  # seconds between checks for tokens past half their lifetime


def default_state_dir(environ: dict[str, str] | None = None) -> Path:
    """`$XDG_STATE_HOME/meshctl`, else `~/.local/state/meshctl` (read when called, never at import)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshctl"


@dataclass(frozen=True)
class StateLayout:
    """Where the local mesh keeps its security state (see the module docstring)."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def trust_bundle(self) -> Path:
        return self.root / "root-cert.pem"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def secrets(self) -> Path:
        """The local secret store: `<ns>/<name>/` per Gateway `credentialName` (citadel.agent.credentials)."""
        return self.root / "secrets"

    def token_file(self, namespace: str, name: str) -> Path:
        """The credential of WorkloadEntry `namespace/name`."""
        return self.tokens / namespace / f"{name}.token"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory/.lock`, so two processes never create two CAs in one directory."""
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def peer_identity_for(trust_domain: str) -> PeerIdentityHook:
    """The hook pilot calls with a verified client certificate (DER): its SPIFFE identity in `trust_domain`."""
    def identify(der: bytes | None) -> PeerIdentity:
        if der is None:
            raise PeerUnauthenticatedError("no client certificate")
        try:
            cert = x509.load_der_x509_certificate(der)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except (ValueError, x509.ExtensionNotFound):
            uris = []
        if len(uris) != 1:
            raise PeerUnauthenticatedError(f"the client certificate carries {len(uris)} URI SANs, not one SPIFFE "
                                           "workload identity")
        try:
            spiffe = SpiffeId.parse(uris[0])
        except ValueError as exc:
            raise PeerUnauthenticatedError(f"the client certificate's identity is not a workload's: {exc}") from None
        if spiffe.trust_domain != trust_domain:
            raise PeerUnauthenticatedError(f"the client certificate {spiffe.uri} is not of trust domain "
                                           f"{trust_domain!r}")
        return PeerIdentity(spiffe.namespace, spiffe.service_account, spiffe.uri)
    return identify


@dataclass
class _Issued:
    service_account: str
    renew_at: float  # time.monotonic() when the token is past half its lifetime


class MeshSecurity:
    """Citadel in the local mesh: `serving()` for pilot, tokens for sidecars, the exported trust bundle."""

    def __init__(self, state_dir: Path, registry: CollectorRegistry, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 host: str = "127.0.0.1", **citadel_settings: Any) -> None:
        self.layout = StateLayout(state_dir)
        self.trust_domain = trust_domain
        ensure_private_dir(state_dir)
        settings = CitadelSettings(ca_dir=self.layout.ca_dir, trust_domain=trust_domain, grpc_host=host,
                                   grpc_port=0, **citadel_settings)
        with _locked(state_dir):  # the first start creates the root: once, even with two processes
            self.citadel = Citadel(settings, registry)
        self._context: ssl.SSLContext | None = None
        self._issued: dict[tuple[str, str], _Issued] = {}
        self.ca_stopped = False  # see stop_ca
        self.citadel.ca.on_change(self._export_bundle)

    # --- pilot's authenticated port ---------------------------------------------------------------

    def serving(self) -> SecureServing:
        """What pilot needs to serve authenticated xDS and the CSR service on one TLS port."""
        return SecureServing(context=self.ssl_context, peer_identity=peer_identity_for(self.trust_domain),
                             extra_handlers=(_StoppableCA(make_handler(self.citadel.service), self),))

    def ssl_context(self) -> ssl.SSLContext:
        """The port's server context: the CA-issued server certificate, client certificates verified if given."""
        if self.citadel.serving.fetch() is not None or self._context is None:
            self._context = self._build_context()
        return self._context

    def _build_context(self) -> ssl.SSLContext:
        serving = self.citadel.serving
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["h2"])
        # ssl loads keys from files only: a private temp dir (0700), the key file 0600, gone at once.
        with tempfile.TemporaryDirectory(prefix="meshctl-tls-") as tmp:
            key, chain = Path(tmp) / "key.pem", Path(tmp) / "chain.pem"
            write_secret_file(key, serving.key_pem)
            write_file_atomic(chain, serving.chain_pem, PUBLIC_MODE)
            ctx.load_cert_chain(chain, key)
        ctx.load_verify_locations(cadata=certs_pem(self.citadel.ca.trust_bundle()))
        ctx.verify_mode = ssl.CERT_OPTIONAL  # CSR callers have no certificate yet; ADS checks for one
        return ctx

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start Citadel's background checks (its gRPC service is served by pilot) and export the roots."""
        self._export_bundle(self.citadel.ca.bundle)
        ensure_private_dir(self.layout.tokens)
        await self.citadel.start(serve=False)

    async def stop(self) -> None:
        """Stop Citadel's background checks."""
        await self.citadel.stop()

    async def stop_ca(self) -> None:
        """Take the CA down while pilot keeps serving xDS on the shared port (an outage drill for tests):
        CreateCertificate answers UNAVAILABLE, as an unreachable CA does to an agent, and the background
        checks (expiry, rotation) stop. `start_ca` brings it back."""
        self.ca_stopped = True
        await self.citadel.stop()

    async def start_ca(self) -> None:
        """Undo `stop_ca`: sign CSRs again and restart the background checks."""
        await self.citadel.start(serve=False)
        self.ca_stopped = False

    def _export_bundle(self, bundle: CABundle) -> None:
        write_file_atomic(self.layout.trust_bundle, certs_pem(bundle.roots).encode("ascii"), PUBLIC_MODE)

    # --- workload credentials -------------------------------------------------------------------

    def sync_tokens(self, workloads: dict[tuple[str, str], str]) -> int:
        """Issue tokens for new, changed or half-expired workloads, delete those of removed ones; how many issued.

        `workloads` maps (namespace, name) to the WorkloadEntry's service account.
        """
        now = time.monotonic()
        issued = 0
        for (namespace, name), account in sorted(workloads.items()):
            known = self._issued.get((namespace, name))
            if known is not None and known.service_account == account and now < known.renew_at:
                continue
            path = self.layout.token_file(namespace, name)
            ensure_private_dir(path.parent)
            self.citadel.issue_workload_token(path, namespace, account, TOKEN_TTL)
            self._issued[(namespace, name)] = _Issued(account, now + TOKEN_TTL.total_seconds() / 2)
            issued += 1
        for namespace, name in [key for key in self._issued if key not in workloads]:
            self.layout.token_file(namespace, name).unlink(missing_ok=True)
            del self._issued[(namespace, name)]
        return issued

    def _remove_stale_tokens(self) -> None:
        """Tokens a previous run left for workloads this one does not know (it issues its own)."""
        for path in self.layout.tokens.glob("*/*.token"):
            if (path.parent.name, path.name.removesuffix(".token")) not in self._issued:
                path.unlink(missing_ok=True)

    async def keep_tokens(self, pilot: Any) -> None:
        """Forever: sync tokens with the mesh pilot serves, after every config change and every TOKEN_CHECK."""
        self.sync_tokens(workload_accounts(pilot.pusher.mesh))
        self._remove_stale_tokens()
        while True:
            revision = pilot.store.revision
            self.sync_tokens(workload_accounts(pilot.pusher.mesh))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TOKEN_CHECK):
                    changed = await pilot.store.wait_for_change(revision)
                    await pilot.pusher.wait_built(changed)


class _StoppableCA:
    """The CSR service's handler (a gRPC generic handler), answering UNAVAILABLE while `security.ca_stopped`
    (see `MeshSecurity.stop_ca`). Cost: one attribute read per call."""

    def __init__(self, inner: grpc.GenericRpcHandler, security: MeshSecurity) -> None:
        self._inner = inner
        self._security = security
        self._down = grpc.unary_unary_rpc_method_handler(_ca_stopped)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        found = self._inner.service(handler_call_details)
        return self._down if found is not None and self._security.ca_stopped else found


async def _ca_stopped(_request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await context.abort(grpc.StatusCode.UNAVAILABLE, "citadel: the CA is stopped")
    return b""  # not reached: abort raises


def workload_accounts(mesh: Any) -> dict[tuple[str, str], str]:
    """(namespace, name) -> service account ("default" when unset) of every WorkloadEntry in `mesh`."""
    if mesh is None:
        return {}
    return {key: (workload.service_account or "default") for key, workload in mesh.workloads.items()}
