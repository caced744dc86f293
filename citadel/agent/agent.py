"""The workload agent: keeps one workload's key and certificate fresh and serves them to its Envoy.

`WorkloadAgent` generates a key in memory (a new one per certificate), asks the CSR service for
a certificate over TLS with the workload's token, checks the answer, and publishes `default`
and `ROOTCA` to the `SecretStore` that its SDS server streams to Envoy. It renews after about half
of the certificate's remaining lifetime (with jitter, so a fleet started together does not renew
together); while the CA is unreachable or refuses, it retries with exponential backoff and keeps
serving the current certificate (until it expires: Envoy then presents an expired certificate and
peers refuse it, which the log says loudly). The private key and the token are never written or
logged; logs name the identity, serials, expiries and root fingerprints.

Trust for the CA connection is the root file plus the trust bundle the CA last sent, so the agent
keeps reaching the CA across a root rotation (the CA's serving certificate moves to the new root
after every agent has learned it). The channel is rebuilt when that set changes and after a
failed call (a fresh channel reconnects at once instead of waiting out gRPC's reconnect backoff).

A gateway's agent (`credential_dir` set) also serves the `credentialName` secrets of its own
namespace from the local secret store (`citadel.agent.credentials`), polled for changes.

Concurrency: one guarded background task (`_run`) is the only writer of the credential and the
store's workload secrets (`_watch_credentials` writes the gateway's ones); SDS streams read the
store on the same event loop. Key generation runs in a worker thread
(RSA-4096 takes about a second). Cost per renewal: one key, one CSR, one RPC (~1 ms of CPU for ECDSA).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType

import grpc
from prometheus_client import CollectorRegistry

from citadel.agent.credential import (
    Backoff,
    CertificateResponseError,
    WorkloadCredential,
    accept_response,
    new_request,
    renewal_delay,
    same_roots,
)
from citadel.agent.credentials import load_credentials, scan_fingerprint
from citadel.agent.metrics import AgentMetrics
from citadel.agent.sds import SDSServer
from citadel.agent.secrets import SecretStore
from citadel.agent.settings import AgentSettings
from citadel.authority import utc_now
from citadel.client import CSRClient
from citadel.errors import CAConfigError, CitadelError
from citadel.identity import SpiffeId
from citadel.keys import certs_pem, fingerprint, load_certs

log = logging.getLogger(__name__)

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
_REJECTED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT}


class TokenError(CitadelError):
    """The workload token file cannot be read (names the file, never the content)."""


def failure_reason(exc: BaseException) -> str:
    """The `reason` label of a failed attempt: unavailable, rejected, bad_response, token, roots, error."""
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        return "unavailable" if code in _UNAVAILABLE else "rejected" if code in _REJECTED else "error"
    if isinstance(exc, CertificateResponseError):
        return "bad_response"
    if isinstance(exc, TokenError):
        return "token"
    if isinstance(exc, CAConfigError):
        return "roots"
    return "error"


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


class WorkloadAgent:
    """One workload's agent. `async with WorkloadAgent(settings, registry) as agent:` runs it."""

    def __init__(self, settings: AgentSettings, registry: CollectorRegistry, *,
                 clock: Callable[[], datetime] = utc_now, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.identity = SpiffeId(settings.trust_domain, settings.namespace, settings.service_account)
        self.metrics = AgentMetrics(registry)
        self.store = SecretStore()
        self.sds = SDSServer(self.store, self.metrics)
        self.credential: WorkloadCredential | None = None
        self.ready = asyncio.Event()  # set once the first certificate is served
        self._clock = clock
        self._rng = rng or random.Random()
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self._client: CSRClient | None = None
        self._client_roots: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None
        self._credentials_task: asyncio.Task[None] | None = None
        self._credential_errors: set[tuple[str, str]] = set()

    # --- one attempt ------------------------------------------------------------------------------

    def _read_token(self) -> str:
        path = self.settings.token_file
        try:
            token = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"token_file {path}: cannot read ({type(exc).__name__})") from None
        if not token:
            raise TokenError(f"token_file {path}: empty")
        return token

    def _ca_trust(self) -> list[str]:
        path = self.settings.ca_root_file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CAConfigError(f"ca_root_file {path}: cannot read ({exc.strerror})") from None
        roots = load_certs(data, f"ca_root_file {path}")
        if self.credential is not None:
            roots += self.credential.roots
        if not roots:
            raise CAConfigError(f"ca_root_file {path}: holds no certificate")
        unique = {fingerprint(c): c for c in roots}
        return [certs_pem([unique[f]]) for f in sorted(unique)]

    async def _ca_client(self) -> CSRClient:
        trust = self._ca_trust()
        key = frozenset(trust)
        if self._client is None or key != self._client_roots:
            await self._close_client()
            self._client = CSRClient(self.settings.ca_address, "".join(trust).encode("ascii"),
                                     server_name=self.settings.ca_server_name)
            self._client_roots = key
        return self._client

    async def _close_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def obtain(self) -> WorkloadCredential:
        """One attempt: new key, CSR, CreateCertificate, check the answer, publish it to SDS."""
        token = self._read_token()
        client = await self._ca_client()
        key, csr = await asyncio.to_thread(new_request, self.identity, self.settings.key_algorithm)
        try:
            chain = await client.create_certificate(
                csr, int(self.settings.cert_ttl.total_seconds()), token=token,
                timeout=self.settings.ca_timeout.total_seconds())
        except grpc.aio.AioRpcError:
            await self._close_client()  # a fresh channel next time, not gRPC's reconnect backoff
            raise
        credential = accept_response(self.identity, key, chain, self._clock())
        self._publish(credential)
        return credential

    def _publish(self, credential: WorkloadCredential) -> None:
        previous, self.credential = self.credential, credential
        self.store.publish(credential)
        self.metrics.issued.inc()
        self.metrics.expiry.set(credential.not_after.timestamp())
        if previous is None:
            log.info("citadel agent: %s: certificate obtained, %s", self.identity, credential.describe())
        else:
            self.metrics.renewals.inc()
            log.info("citadel agent: %s: certificate renewed, %s", self.identity, credential.describe())
            if not same_roots(previous.roots, credential.roots):
                log.info("citadel agent: %s: trust bundle changed to %d root(s)", self.identity,
                         len(credential.roots))
        self.ready.set()

    # --- the renewal loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        """Obtain, sleep until renewal, repeat; on failure back off and keep serving what we have."""
        while True:
            try:
                credential = await self.obtain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await asyncio.sleep(self._failed(exc).total_seconds())
                continue
            self._backoff.reset()
            delay = renewal_delay(credential, self._clock(), self.settings.renew_fraction,
                                  self.settings.renew_jitter, self._rng)
            log.debug("citadel agent: %s: next renewal in %s", self.identity, delay)
            await asyncio.sleep(delay.total_seconds())

    def _failed(self, exc: Exception) -> timedelta:
        """Count and log a failed attempt; the delay before the next one."""
        reason = failure_reason(exc)
        self.metrics.failures.labels(reason).inc()
        delay = self._backoff.next_delay(self._rng)
        current = self.credential
        if current is None:
            serving = "no certificate yet, Envoy waits for one"
        elif current.not_after <= self._clock():
            serving = f"the served certificate EXPIRED at {current.not_after.isoformat()}"
        else:
            serving = f"still serving serial {current.leaf.serial_number:x} until {current.not_after.isoformat()}"
        log_at = logging.ERROR if reason == "error" else logging.WARNING
        log.log(log_at, "citadel agent: %s: obtaining a certificate from %s failed (%s: %s); retry in %.1fs; %s",
                self.identity, self.settings.ca_address, reason, _describe_failure(exc), delay.total_seconds(),
                serving, exc_info=exc if reason == "error" else None)
        return delay

    # --- a gateway's credentialName secrets ------------------------------------------------------

    @property
    def credential_namespace_dir(self) -> Path | None:
        """The one directory of secrets this agent may serve: its own namespace's (Istio's rule)."""
        root = self.settings.credential_dir
        return None if root is None else root / self.settings.namespace

    def reload_credentials(self) -> bool:
        """Re-read the namespace's secret directory and publish it; True if a served secret changed.

        Each left-out secret is logged once per distinct reason (file and reason, never content)."""
        directory = self.credential_namespace_dir
        if directory is None:
            return False
        secrets, errors = load_credentials(directory)
        seen = {(e.name, e.reason) for e in errors}
        for name, reason in sorted(seen - self._credential_errors):
            log.warning("citadel agent: %s: secret %r not served: %s", self.identity, name, reason)
        self._credential_errors = seen
        changed = self.store.publish_extra(secrets.values())
        if changed:
            log.info("citadel agent: %s: serving %d credential secret(s) from %s: %s", self.identity,
                     len(secrets), directory, sorted(secrets))
        return changed

    async def _watch_credentials(self, directory: Path) -> None:
        """Poll the directory's file metadata; re-read once a change has settled for one interval, so a
        writer replacing `tls.crt` then `tls.key` is read as one change (a rename-into-place too)."""
        seen = scan_fingerprint(directory)
        pending = False
        while True:
            await asyncio.sleep(self.settings.credential_poll.total_seconds())
            now = await asyncio.to_thread(scan_fingerprint, directory)
            if now != seen:
                seen, pending = now, True
            elif pending:
                pending = False
                self.reload_credentials()

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve SDS (Envoy may connect at once; it waits for the first certificate) and start renewing;
        with a credential directory, serve its secrets at once and watch it."""
        directory = self.credential_namespace_dir
        if directory is not None:
            self.reload_credentials()
        await self.sds.start(self.settings.sds_socket)
        self._task = asyncio.create_task(self._run(), name=f"citadel-agent-{self.identity}")
        if directory is not None:
            self._credentials_task = asyncio.create_task(self._watch_credentials(directory),
                                                         name=f"citadel-agent-credentials-{self.identity}")

    async def stop(self) -> None:
        """Stop renewing and watching, close the CA channel, stop SDS and remove its socket."""
        for task in (self._task, self._credentials_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._credentials_task = None
        await self._close_client()
        await self.sds.stop()

    async def __aenter__(self) -> WorkloadAgent:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
