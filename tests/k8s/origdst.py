"""A tiny TCP server and client that show where a connection went, for the pod sandbox tests.

`python origdst.py serve TAG:PORT...` listens on 0.0.0.0 on each port and answers every
connection with one line `TAG <original destination> <peer address>`, the original destination
read with SO_ORIGINAL_DST (what an iptables REDIRECT kept, as Envoy's original_dst filter reads
it), or `-` when the connection was not redirected. It prints `ready` once all ports listen.
`python origdst.py ask HOST PORT [SOURCE]` connects (from SOURCE if given), prints the answer,
or `refused`/`timeout`. Standard library only, so it runs as any UID inside a pod namespace.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import sys

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_destination(sock: socket.socket) -> str:
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return "-"
    port, packed = struct.unpack_from("!2xH4s", raw)
    orig = f"{socket.inet_ntoa(packed)}:{port}"
    return "-" if orig == "{}:{}".format(*sock.getsockname()) else orig


async def serve(specs: list[str]) -> None:
    async def handler(tag: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")[0]
        writer.write(f"{tag} {original_destination(sock)} {peer}\n".encode())
        await writer.drain()
        writer.close()

    servers = []
    for spec in specs:
        tag, port = spec.rsplit(":", 1)
        servers.append(await asyncio.start_server(functools.partial(handler, tag), "0.0.0.0", int(port)))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def ask(host: str, port: int, source: str | None = None) -> str:
    try:
        with socket.create_connection((host, port), timeout=5, source_address=(source, 0) if source else None) as s:
            return s.makefile().readline().strip() or "closed"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2:]))
    else:
        print(ask(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None))
