"""The injector's thin server: the webhook handlers over HTTPS (15017), certificate from the mesh CA.

`serve_webhooks(ca, settings)` is the one call the control plane's wiring makes.
`WebhookServer(webhooks, serving)` binds an aiohttp site with `RotatingTLS`; `start` returns the
bound port (0 picks a free one), `stop` closes it. `namespace_lookup(api)` reads a namespace's
labels from the API server for `Webhooks` (cached a few seconds: a Deployment scaled to a hundred
pods asks once, and a label change is seen within the cache time). Everything runs on the
caller's event loop; the control plane's wiring builds one server next to pilot and citadel.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType

from aiohttp import web
from kubernetes_asyncio.client import ApiClient, CoreV1Api

from citadel.authority import CertificateAuthority
from citadel.keys import certs_pem
from citadel.server import ServingCertificate
from injector.metrics import WebhookMetrics
from injector.settings import InjectSettings
from injector.tls import RotatingTLS
from injector.webhook import NamespaceLabels, Webhooks, assume_enrolled

WEBHOOK_PORT = 15017
# The names the API server may use for the control plane's Service (Istio's istiod), and loopback.
DNS_NAMES = ("istiod.istio-system.svc", "istiod.istio-system.svc.cluster.local", "localhost")


def dns_names(namespace: str, service: str = "istiod") -> tuple[str, ...]:
    """The names the API server uses for the webhook Service in `namespace` (`<svc>.<ns>.svc`)."""
    return (f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local", "localhost")
NAMESPACE_CACHE_S = 5.0


def serving_certificate(ca: CertificateAuthority, ips: tuple[str, ...] = ("127.0.0.1",),
                        dns_names: tuple[str, ...] = DNS_NAMES) -> ServingCertificate:
    """The webhook's certificate, issued (and re-issued) by the mesh CA; its root is the caBundle."""
    return ServingCertificate(ca, dns_names, ips)


def ca_bundle(ca: CertificateAuthority) -> bytes:
    """The roots the API server must trust to call the webhooks (a webhook configuration's caBundle)."""
    return certs_pem(ca.trust_bundle()).encode()


def namespace_lookup(api: ApiClient, ttl_s: float = NAMESPACE_CACHE_S) -> NamespaceLabels:
    """A `NamespaceLabels` reading `GET /api/v1/namespaces/<ns>` (needs RBAC `get` on namespaces)."""
    core = CoreV1Api(api)
    cache: dict[str, tuple[float, Mapping[str, str]]] = {}

    async def labels(namespace: str) -> Mapping[str, str]:
        now = time.monotonic()
        hit = cache.get(namespace)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await core.read_namespace(namespace)
        value: Mapping[str, str] = dict(found.metadata.labels or {})
        cache[namespace] = (now + ttl_s, value)
        return value

    return labels


@contextlib.asynccontextmanager
async def serve_webhooks(ca: CertificateAuthority, settings: InjectSettings, *, host: str = "0.0.0.0",
                         port: int = WEBHOOK_PORT, namespace_labels: NamespaceLabels = assume_enrolled,
                         names: tuple[str, ...] = DNS_NAMES,
                         ips: tuple[str, ...] = ("127.0.0.1",),
                         metrics: WebhookMetrics | None = None,
                         mesh_metadata: Callable[[], Mapping[str, str]] = dict) -> AsyncIterator[WebhookServer]:
    """The control plane's webhooks, serving until the block ends: how `meshctl up` wires them.

    `namespace_labels` defaults to trusting the webhook configuration's namespaceSelector (Istio's
    model, no RBAC needed); `namespace_lookup(api)` re-checks the labels with the API server.
    `metrics`: where reviews are counted (pilot's registry, so `/metrics` shows them).
    `mesh_metadata()`: the mesh config's `defaultConfig.proxyMetadata` now (`Webhooks`).
    """
    server = WebhookServer(Webhooks(settings, namespace_labels, metrics, mesh_metadata),
                           serving_certificate(ca, ips, names))
    await server.start(host, port)
    try:
        yield server
    finally:
        await server.stop()


class WebhookServer:
    """`start` it (or `async with` it after `start`) and `stop` it; one listening socket."""

    def __init__(self, webhooks: Webhooks, serving: ServingCertificate) -> None:
        self.webhooks = webhooks
        self.tls = RotatingTLS(serving)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str = "0.0.0.0", port: int = WEBHOOK_PORT) -> int:
        """Listen on `host:port` over TLS; the bound port."""
        sock = socket.create_server((host, port))  # bound here: the port is known even when 0 was asked
        runner = web.AppRunner(self.webhooks.application(), access_log=None)
        try:
            await runner.setup()
            await web.SockSite(runner, sock, ssl_context=self.tls.context).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner = runner
        self.port = int(sock.getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> WebhookServer:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
