"""A small CreateCertificate client (the workload agent's transport; tests and benchmarks use it too).

One `CSRClient` keeps one TLS channel to the CA, trusting the mesh root bundle it is given and
presenting the workload credential as `authorization: Bearer <token>`.
"""

from __future__ import annotations

from types import TracebackType

import grpc
from grpc import aio

from citadel.proto import istio_ca_pb2 as pb
from citadel.server import METHOD


class CSRClient:
    """Async client of `istio.v1.auth.IstioCertificateService`."""

    def __init__(self, target: str, root_pem: bytes, *, server_name: str | None = None) -> None:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self._channel = aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root_pem),
                                           options=options)
        self._call = self._channel.unary_unary(
            METHOD, request_serializer=pb.IstioCertificateRequest.SerializeToString,
            response_deserializer=pb.IstioCertificateResponse.FromString)

    async def create_certificate(self, csr_pem: str, validity_seconds: int = 0, *, token: str | None = None,
                                 timeout: float = 10.0) -> list[str]:
        """The PEM chain (leaf first); raises grpc.aio.AioRpcError with the server's status on refusal."""
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        request = pb.IstioCertificateRequest(csr=csr_pem, validity_duration=validity_seconds)
        response: pb.IstioCertificateResponse = await self._call(request, metadata=metadata, timeout=timeout)
        return list(response.cert_chain)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> CSRClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
