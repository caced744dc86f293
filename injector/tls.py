"""The webhooks' TLS: a server certificate issued by the mesh CA, renewed without a restart.

`ServingCertificate` (citadel) issues and re-issues the key and chain; `RotatingTLS` turns them
into `ssl.SSLContext`s. The listening context has a servername callback that OpenSSL runs on
every ClientHello (with or without SNI: the API server calling `https://127.0.0.1:port` sends
none); it asks the certificate to renew when due or when the CA changed, and hands the handshake a
context built from the current key and chain. So a renewal costs one key generation and one
context (a few milliseconds), on the event loop, at the first handshake after it is due; a
failed renewal keeps the current certificate (logged by citadel).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from citadel.server import ServingCertificate


def server_context(key_pem: bytes, chain_pem: bytes) -> ssl.SSLContext:
    """A TLS 1.2+ server context for this key and chain (through a private temporary directory:
    `ssl` loads certificates only from files)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="meshctl-webhook-") as directory:
        key, chain = Path(directory) / "key.pem", Path(directory) / "chain.pem"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        chain.write_bytes(chain_pem)
        ctx.load_cert_chain(chain, key)
    return ctx


class RotatingTLS:
    """The listening `context`, which serves whatever certificate `serving` holds now."""

    def __init__(self, serving: ServingCertificate) -> None:
        self.serving = serving
        self._key = serving.key_pem
        self._current = server_context(serving.key_pem, serving.chain_pem)
        self.context = server_context(serving.key_pem, serving.chain_pem)
        self.context.sni_callback = self._select

    def _select(self, conn: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None,
                _ctx: ssl.SSLContext) -> int | None:
        self.serving.fetch()  # re-issues when half the lifetime passed or the CA's bundle changed
        if self.serving.key_pem != self._key:
            self._current = server_context(self.serving.key_pem, self.serving.chain_pem)
            self._key = self.serving.key_pem
        conn.context = self._current
        return None
