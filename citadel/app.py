"""Citadel wiring: builds the CA, the token issuer/verifier, the CSR service and its server once from
`CitadelSettings`, starts and stops them. Everything runs on the caller's event loop.

One guarded background task checks, every `check_interval` (in a worker thread): CA expiry (warning log + gauges),
the self-signed root rotation step due (`rotation.next_action`), and a plugged-in CA's files
(reloaded when they change; a bad new set keeps the old CA serving). A failure of one round is
logged with context and counted in `citadel_task_failures{task}`, and the next round runs anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter

from citadel.authn import Authenticator, KubernetesTokenReviewAuthenticator, LocalTokenAuthenticator, TokenReviewClient
from citadel.authority import CertificateAuthority, utc_now
from citadel.ca import WorkloadCertPolicy
from citadel.metrics import CitadelMetrics
from citadel.rotation import RotationPolicy, initial_state
from citadel.server import CSRServer, ServingCertificate, ips_for
from citadel.service import CSRService
from citadel.settings import CitadelSettings
from citadel.store import SelfSignedStore, new_root
from citadel.tokens import TokenIssuer, TokenVerifier

log = logging.getLogger(__name__)


class Citadel:
    """One CA instance. `async with Citadel(settings, registry) as citadel:` runs it."""

    def __init__(self, settings: CitadelSettings, registry: CollectorRegistry,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = CitadelMetrics(registry, clock)
        self.failures = Counter("citadel_task_failures", "failures of citadel background work", ["task"],
                                registry=registry)
        policy = WorkloadCertPolicy(settings.workload_cert_ttl, settings.max_workload_cert_ttl)
        self.rotation_policy = RotationPolicy(settings.expiry_warn_fraction, settings.root_propagation,
                                              settings.max_workload_cert_ttl)
        if settings.cacerts_dir is not None:
            self.ca = CertificateAuthority.plugged(
                settings.cacerts_dir, policy, trust_domain=settings.trust_domain, metrics=self.metrics, clock=clock,
                warn_fraction=settings.expiry_warn_fraction)
        elif settings.external_roots:  # e.g. `meshctl up --kubeconfig`: `citadel.kube_store` hands the roots over
            placeholder = new_root(settings.key_algorithm, settings.trust_domain, clock(), settings.root_ttl)
            self.ca = CertificateAuthority(
                initial_state(placeholder, clock()).bundle, policy, trust_domain=settings.trust_domain,
                metrics=self.metrics, clock=clock, warn_fraction=settings.expiry_warn_fraction)
        else:
            self.ca = CertificateAuthority.self_signed(
                settings.ca_dir, policy, trust_domain=settings.trust_domain, algorithm=settings.key_algorithm,
                root_ttl=settings.root_ttl, metrics=self.metrics, clock=clock,
                warn_fraction=settings.expiry_warn_fraction)
        token_key = SelfSignedStore(settings.ca_dir).load_or_create_token_key()
        self.token_issuer = TokenIssuer(token_key, issuer=settings.token_issuer, audience=settings.token_audience)
        verifier = TokenVerifier([token_key.public_key()], issuer=settings.token_issuer,
                                 audience=settings.token_audience)
        self.authenticators: list[Authenticator] = [LocalTokenAuthenticator(verifier, settings.trust_domain, clock)]
        self.service = CSRService(self.ca, self.authenticators, self.metrics)
        self.serving = ServingCertificate(self.ca, settings.server_dns_names, ips_for(settings.grpc_host))
        self.server = CSRServer(self.service, self.serving)
        self.port = 0
        self._task: asyncio.Task[None] | None = None

    def use_token_review(self, client: TokenReviewClient) -> None:
        """Also accept Kubernetes service-account tokens for `settings.token_audience`, reviewed by the
        API server through `client` (after the local tokens; see `citadel.tokenreview`)."""
        authenticator = KubernetesTokenReviewAuthenticator(client, self.settings.trust_domain,
                                                           self.settings.token_audience)
        self.authenticators.append(authenticator)
        self.service.authenticators.append(authenticator)

    def issue_workload_token(self, path: Path, namespace: str, service_account: str,
                             ttl: timedelta = timedelta(hours=24)) -> str:
        """Issue a workload credential for `namespace`/`service_account` into `path` (0600)."""
        return self.token_issuer.issue_to_file(path, namespace, service_account, ttl, self.ca.clock())

    def check_once(self) -> None:
        """One round of the background checks (expiry warning, rotation step, cacerts reload)."""
        for name, step in (("expiry", self.ca.check_expiry), ("reload", self.ca.reload),
                           ("rotation", self._rotate)):
            try:
                step()
            except Exception as exc:
                self.failures.labels(name).inc()
                log.error("citadel: background %s check failed: %s", name, exc, exc_info=exc)

    def _rotate(self) -> None:
        if self.settings.rotate_roots:
            self.ca.rotation_tick(self.rotation_policy)

    async def _checks(self) -> None:
        while True:
            # In a worker thread: a rotation step may generate a key (RSA-4096: about a second). The
            # step ends by replacing `ca.bundle`, which request handlers read once per call.
            await asyncio.to_thread(self.check_once)
            await asyncio.sleep(self.settings.check_interval.total_seconds())

    async def start(self, *, serve: bool = True) -> None:
        """Start the CSR server (unless `serve` is False: a composition root such as `meshctl up`
        then serves `citadel.server.make_handler(self.service)` on a gRPC server of its own) and
        the background checks."""
        if serve:
            self.port = await self.server.start(self.settings.grpc_host, self.settings.grpc_port)
        self._task = asyncio.create_task(self._checks(), name="citadel-checks")

    async def stop(self) -> None:
        """Stop the background checks, then the server."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.server.stop()

    async def __aenter__(self) -> Citadel:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
