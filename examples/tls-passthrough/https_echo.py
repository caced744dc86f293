"""The echo app over HTTPS, for the tls-passthrough example: a TLS backend that says who it is.

Usage: ``python examples/tls-passthrough/https_echo.py VERSION PORT CERT KEY``; it listens on
127.0.0.1:PORT, where the backend's sidecar forwards the still-encrypted connection.
"""

import ssl
import sys

from aiohttp import web

from meshctl.echoapp import make_app


def main(version: str, port: int, cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    web.run_app(make_app("secure", version), host="127.0.0.1", port=port, ssl_context=context)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
