"""What the agent serves over SDS: Envoy `Secret`s named as Istio names them, and their store.

`default` is the workload's `tls_certificate` (chain and private key), `ROOTCA` the
`validation_context` (the trust bundle). Each secret's version is a hash of its serialized
bytes, so an unchanged secret keeps its version and is never pushed again (a renewal changes
`default`; `ROOTCA` changes only when the CA's trust bundle does).

A gateway's agent also serves its `credentialName` certificates (`publish_extra`, from
`citadel.agent.credentials`), under Istio's ``kubernetes://`` names, beside the two above.

Concurrency: the agent's renewal task (`publish`) and its credential poll task
(`publish_extra`) are the only writers; SDS streams read
`current` and await `changed`. Everything runs on one event loop; a publish wakes every waiting
stream once. Cost of a publish: serializing two small messages and a SHA-256 over ~2 KB.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from google.protobuf import any_pb2

from citadel.agent.credential import WorkloadCredential

WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass(frozen=True)
class ServedSecret:
    """One secret ready to send: its name, version (content hash) and packed `Any`."""

    name: str
    version: str
    resource: any_pb2.Any


def workload_secret(credential: WorkloadCredential) -> secret_pb2.Secret:
    """`default`: the leaf and intermediates plus the private key, inline."""
    return secret_pb2.Secret(name=WORKLOAD_SECRET, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=credential.chain_pem()),
        private_key=base_pb2.DataSource(inline_bytes=credential.key_pem())))


def root_secret(credential: WorkloadCredential) -> secret_pb2.Secret:
    """`ROOTCA`: the mesh trust bundle (old and new roots during a rotation), inline."""
    return secret_pb2.Secret(name=ROOT_SECRET, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=credential.roots_pem())))


def _served(secret: secret_pb2.Secret) -> ServedSecret:
    packed = any_pb2.Any(type_url=SECRET_TYPE_URL, value=secret.SerializeToString(deterministic=True))
    return ServedSecret(secret.name, hashlib.sha256(packed.value).hexdigest()[:16], packed)


class SecretStore:
    """The secrets the agent serves now; streams wait on `changed` for the next publish."""

    def __init__(self) -> None:
        self._secrets: Mapping[str, ServedSecret] = MappingProxyType({})
        self._workload: dict[str, ServedSecret] = {}
        self._extra: dict[str, ServedSecret] = {}  # a gateway's credentialName secrets
        self.generation = 0
        self._changed = asyncio.Event()

    @property
    def current(self) -> Mapping[str, ServedSecret]:
        """An immutable view of every secret by name (empty until the first certificate)."""
        return self._secrets

    def publish(self, credential: WorkloadCredential) -> None:
        """Serve `credential` from now on and wake every stream (they compare versions)."""
        served = (_served(workload_secret(credential)), _served(root_secret(credential)))
        self._workload = {s.name: s for s in served}
        self._bump()

    def publish_extra(self, secrets: Iterable[secret_pb2.Secret]) -> bool:
        """Serve exactly `secrets` besides the workload's (a gateway's certificates); False if none changed.

        The workload's own names (`default`, `ROOTCA`) cannot be replaced this way."""
        served = {s.name: _served(s) for s in secrets if s.name not in (WORKLOAD_SECRET, ROOT_SECRET)}
        if {n: s.version for n, s in served.items()} == {n: s.version for n, s in self._extra.items()}:
            return False
        self._extra = served
        self._bump()
        return True

    def _bump(self) -> None:
        self._secrets = MappingProxyType({**self._extra, **self._workload})
        self.generation += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def changed(self, generation: int) -> None:
        """Return once the store is newer than `generation`."""
        while self.generation <= generation:
            await self._changed.wait()
