"""Helpers for tests and trials of the agent: an SDS client over a Unix socket, secrets decoded.

`SDSStream` is what Envoy does on the wire (one StreamSecrets or DeltaSecrets call), driven by
hand: send a request, read a response, ACK or NACK it. Reads have a guard timeout so a broken
agent fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from citadel.agent.sds import SERVICE
from citadel.agent.secrets import ROOT_SECRET, SECRET_TYPE_URL, WORKLOAD_SECRET
from citadel.keys import SigningKey

READ_GUARD = 20.0


@dataclass(frozen=True)
class DecodedSecrets:
    """What a response carried, decoded: the chain, the key and the roots (each if present)."""

    chain: list[x509.Certificate]
    key: SigningKey | None
    roots: list[x509.Certificate]


def decode(resources: list[Any]) -> DecodedSecrets:
    """Decode packed `Secret`s (`default` and/or `ROOTCA`)."""
    chain: list[x509.Certificate] = []
    roots: list[x509.Certificate] = []
    key: Any = None
    for packed in resources:
        secret = secret_pb2.Secret()
        packed.Unpack(secret)
        if secret.name == WORKLOAD_SECRET:
            chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
            key = load_pem_private_key(secret.tls_certificate.private_key.inline_bytes, password=None)
        elif secret.name == ROOT_SECRET:
            roots = x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)
    return DecodedSecrets(chain, key, roots)


def names_of(response: Any) -> list[str]:
    """The secret names a SotW or delta response carries."""
    out = []
    for item in response.resources:
        packed = item.resource if isinstance(item, discovery_pb2.Resource) else item
        secret = secret_pb2.Secret()
        packed.Unpack(secret)
        out.append(secret.name)
    return out


class SDSStream:
    """One SDS call over `unix:<socket>`; `delta=True` uses DeltaSecrets."""

    def __init__(self, socket: Path, *, delta: bool = False) -> None:
        self.delta = delta
        self._channel = grpc.aio.insecure_channel(f"unix:{socket}")
        if delta:
            req, resp = discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
            method = "DeltaSecrets"
        else:
            req, resp = discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse
            method = "StreamSecrets"
        self._call = self._channel.stream_stream(f"/{SERVICE}/{method}", request_serializer=req.SerializeToString,
                                                 response_deserializer=resp.FromString)()

    async def send(self, request: Any) -> None:
        """Write one request."""
        await self._call.write(request)

    async def subscribe(self, *names: str, version: str = "", nonce: str = "") -> None:
        """SotW: ask for `names` (an ACK of `nonce` when given)."""
        await self.send(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE_URL, resource_names=list(names),
                                                       version_info=version, response_nonce=nonce))

    async def ack(self, response: Any, *names: str) -> None:
        """SotW: acknowledge `response`, keeping `names` subscribed."""
        await self.subscribe(*names, version=response.version_info, nonce=response.nonce)

    async def nack(self, response: Any, *names: str, message: str = "rejected by test") -> None:
        """SotW: reject `response` (keeping the previous version), keeping `names` subscribed."""
        await self.send(discovery_pb2.DiscoveryRequest(
            type_url=SECRET_TYPE_URL, resource_names=list(names), version_info="", response_nonce=response.nonce,
            error_detail=status_pb2.Status(code=13, message=message)))

    async def read(self, timeout: float = READ_GUARD) -> Any:
        """The next response (raises TimeoutError after `timeout`, the guard, or if the call ended)."""
        async with asyncio.timeout(timeout):
            response = await self._call.read()
        if response is grpc.aio.EOF:
            raise EOFError("the agent ended the SDS stream")
        return response

    async def close(self) -> None:
        """Cancel the call and close the channel."""
        self._call.cancel()
        await self._channel.close()

    async def __aenter__(self) -> SDSStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
