"""A TCP server for the tcp-routes example: answers each connection with '<tag>:' + what it read."""

import asyncio
import sys


async def main(tag: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{tag}:".encode() + await reader.read(1024))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
