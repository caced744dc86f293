"""The thin gRPC server for `istio.v1.auth.IstioCertificateService` on 15012, over TLS.

The serving certificate is issued by the mesh CA itself (DNS and IP SANs for the address served)
and re-issued, without restarting the server, when half its lifetime has passed or the CA's bundle
changes: gRPC's dynamic server credentials ask `ServingCertificate.fetch` before new handshakes
(possibly from a gRPC core thread; it only reads the CA's current bundle and swaps its own fields,
and a failure keeps the current certificate).
Handlers run on the grpc.aio event loop and only translate between protobuf messages and
`CSRService`; the messages are the generated classes in `citadel.proto.istio_ca_pb2`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import grpc
from grpc import aio

from citadel.authn import Credentials, bearer_from_metadata
from citadel.authority import CertificateAuthority
from citadel.ca import CABundle, sign_server
from citadel.errors import AuthenticationError, CSRError, IdentityMismatchError, SigningError
from citadel.keys import KeyAlgorithm, cert_pem, certs_pem, generate_key, private_key_pem
from citadel.proto import istio_ca_pb2 as pb
from citadel.service import CSRService

log = logging.getLogger(__name__)

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = f"/{SERVICE}/CreateCertificate"
SERVING_TTL = timedelta(hours=24)


class ServingCertificate:
    """The CSR server's own key and certificate, kept fresh from the mesh CA."""

    def __init__(self, ca: CertificateAuthority, dns_names: Sequence[str], ips: Sequence[str],
                 ttl: timedelta = SERVING_TTL) -> None:
        self._ca = ca
        self.dns_names = list(dns_names)
        self.ips = list(ips)
        self.ttl = ttl
        self._dirty = True
        self._refresh_at: datetime = ca.clock()
        self.key_pem = b""
        self.chain_pem = b""
        ca.on_change(self._bundle_changed)
        self._issue()

    def _bundle_changed(self, _bundle: CABundle) -> None:
        self._dirty = True

    def _issue(self) -> None:
        now = self._ca.clock()
        key = generate_key(KeyAlgorithm.ECDSA_P256)
        bundle = self._ca.bundle
        cert = sign_server(bundle, key.public_key(), self.dns_names, self.ips, self.ttl, now)
        self.key_pem = private_key_pem(key)
        self.chain_pem = (cert_pem(cert) + certs_pem(bundle.intermediates)).encode()
        self._refresh_at = now + (cert.not_valid_after_utc - now) / 2
        self._dirty = False

    def config(self) -> grpc.ServerCertificateConfiguration:
        """The current key and chain as a gRPC certificate configuration."""
        return grpc.ssl_server_certificate_configuration([(self.key_pem, self.chain_pem)])

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when due for renewal or the CA changed, else None."""
        if not self._dirty and self._ca.clock() < self._refresh_at:
            return None
        try:
            self._issue()
        except Exception:  # keep serving the current certificate; logged, retried next handshake
            log.exception("citadel: re-issuing the CSR server certificate failed")
            return None
        return self.config()


def _credentials(context: aio.ServicerContext[pb.IstioCertificateRequest, pb.IstioCertificateResponse]) -> Credentials:
    metadata = [(m[0], m[1]) for m in (context.invocation_metadata() or ())]
    return Credentials(bearer_from_metadata(metadata), context.peer())


def make_handler(service: CSRService) -> grpc.GenericRpcHandler:
    """The generic handler registering CreateCertificate with the generated messages' (de)serializers."""
    async def create_certificate(
        request: pb.IstioCertificateRequest,
        context: aio.ServicerContext[pb.IstioCertificateRequest, pb.IstioCertificateResponse],
    ) -> pb.IstioCertificateResponse:
        try:
            chain = await service.create_certificate(request.csr, request.validity_duration, _credentials(context))
        except AuthenticationError:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "request authenticate failure")
        except IdentityMismatchError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except CSRError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SigningError:
            await context.abort(grpc.StatusCode.INTERNAL, "CSR signing error")
        return pb.IstioCertificateResponse(cert_chain=chain)

    handler = grpc.unary_unary_rpc_method_handler(
        create_certificate,
        request_deserializer=pb.IstioCertificateRequest.FromString,
        response_serializer=pb.IstioCertificateResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"CreateCertificate": handler})


def ips_for(host: str) -> list[str]:
    """The IP SAN for a bind host when it is a literal address (wildcards get 127.0.0.1)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return []
    return ["127.0.0.1"] if addr.is_unspecified else [str(addr)]


class CSRServer:
    """grpc.aio server for the CSR service over TLS; `start` returns the bound port."""

    def __init__(self, service: CSRService, serving: ServingCertificate) -> None:
        self.service = service
        self.serving = serving
        self._server: aio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind `host:port` (0 picks a free port) and start serving."""
        server = aio.server()
        server.add_generic_rpc_handlers((make_handler(self.service),))
        fetcher: Callable[[], grpc.ServerCertificateConfiguration | None] = self.serving.fetch
        creds = grpc.dynamic_ssl_server_credentials(self.serving.config(), fetcher,
                                                    require_client_authentication=False)
        bound = int(server.add_secure_port(f"{host}:{port}", creds))
        if bound == 0:
            raise OSError(f"citadel: cannot bind the CSR server to {host}:{port}")
        await server.start()
        self._server = server
        log.info("citadel: CSR service (IstioCertificateService) on %s:%d over TLS", host, bound)
        return bound

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls; in-flight calls get `grace` seconds."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
