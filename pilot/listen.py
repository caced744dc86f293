"""Exclusive listeners: pilot owns each of its addresses alone, or says at once that it cannot.

Why: gRPC sets SO_REUSEPORT by default, so a second pilot on the same xDS address used to
bind it too and the kernel split new connections between both (proxies got the second one's
config). Pilot's listeners therefore bind without SO_REUSEPORT, and `check_free` probes every
address before pilot loads any config, so a second `meshctl up` ends in one line instead of a
traceback after a long start-up. The probe costs one bind() and close() per address; a race
with another process between probe and bind is still caught by the real bind, reported the
same way.
"""

from __future__ import annotations

import errno
import socket


class AddressInUseError(OSError):
    """Another process listens on an address pilot was told to use; the message names both."""

    def __init__(self, what: str, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"cannot listen for {what} on {host}:{port}: address already in use")
        self.what, self.host, self.port = what, host, port

    def __str__(self) -> str:
        return str(self.strerror)


def check_free(what: str, host: str, port: int) -> None:
    """Raise AddressInUseError if `host:port` cannot be bound now (port 0 always can).

    The probe sets SO_REUSEADDR as asyncio and gRPC do, so a port left in TIME_WAIT by a
    pilot that just stopped counts as free, and never SO_REUSEPORT, so a live listener with or
    without it counts as taken. Other bind errors (an address family the host lacks, no such
    address, permission) are left to the real bind, which reports them itself.
    """
    if port == 0:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUseError(what, host, port) from None
