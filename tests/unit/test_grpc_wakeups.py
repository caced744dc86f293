"""A burst of gRPC completions reaches the event loop at once when its wake-ups are drained.

Over real gRPC: 600 streams from a client process each send one message while the server's
event loop is busy (blocked here), as 2,000 ACKs arrive during a mission-scale fan-out. Counted
in loop turns after it frees up, not in time: with `pilot.xds.wakeups.drain_wakeups` every read
is taken within a few turns; without it (grpcio as it is) gRPC's poller thread has blocked on its
full wake-up socket and the reads come a few hundred at a time, hundreds of turns apart.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest

from pilot.xds.wakeups import drain_wakeups

STREAMS = 600

CLIENT = """
import asyncio, sys, grpc
async def main(port, n):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.stream_stream("/t.Burst/S", request_serializer=bytes, response_deserializer=bytes)
        calls = [method() for _ in range(n)]
        await asyncio.gather(*(call.initial_metadata() for call in calls))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await asyncio.gather(*(call.write(b"x") for call in calls))
        print("sent", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for call in calls:
            call.cancel()
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


async def _turns_to_take_a_burst(drain: bool) -> tuple[bool, int]:
    """(whether the wake-ups were drained, and found so again; loop turns until all STREAMS reads
    were taken). Blocks its own event loop on purpose, hence the blocking calls."""
    loop = asyncio.get_running_loop()
    turns, taken, open_ = 0, [], 0
    all_taken = asyncio.Event()

    async def handler(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        nonlocal open_
        await context.send_initial_metadata(())
        open_ += 1
        await context.read()
        taken.append(turns)
        if len(taken) == STREAMS:
            all_taken.set()
        await context.read()  # EOF or cancelled when the client goes

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Burst", {"S": grpc.stream_stream_rpc_method_handler(handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    drained = drain_wakeups(loop) and drain_wakeups(loop) if drain else False
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), str(STREAMS)],  # noqa: ASYNC220
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        assert (await loop.run_in_executor(None, client.stdout.readline)).strip() == "ready"
        for _ in range(1000):
            if open_ == STREAMS:
                break
            await asyncio.sleep(0.01)
        assert open_ == STREAMS
        client.stdin.write("go\n")
        client.stdin.flush()
        # The loop is busy (blocked) while every message arrives and gRPC completes its read.
        assert client.stdout.readline().strip() == "sent"
        # Time for gRPC to complete every read, on a loaded CI machine too: reads it completes
        # only after the loop frees up would be counted as turns (1 s gave 136 turns once in CI).
        time.sleep(3.0)  # noqa: ASYNC251

        async def tick() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await all_taken.wait()
        ticker.cancel()
        return drained, max(taken)
    finally:
        client.stdin.write("end\n")
        client.stdin.flush()
        client.wait(10)
        await server.stop(1)


@pytest.mark.timeout(60)
async def test_drained_wake_ups_hand_a_burst_of_completions_over_at_once() -> None:
    # Best of up to three bursts: on a loaded machine gRPC's poller thread can wait for a core
    # while the loop spins, and every turn it waits is counted (181 once in CI, with 1863 tests
    # on 2 cores); scheduling only ever adds turns, and the control below stays in the hundreds.
    counted = []
    for _ in range(3):
        drained, turns = await _turns_to_take_a_burst(drain=True)
        assert drained  # gRPC's reader found and wrapped, and found wrapped on a second call
        counted.append(turns)
        if turns <= 60:
            break
    assert min(counted) <= 60, counted  # 3 here: the first turn takes what gRPC queued, the next the rest


@pytest.mark.timeout(60)
async def test_without_draining_grpc_hands_a_burst_over_a_few_hundred_turns_apart() -> None:
    """The control: the flaw the wrapper works around, as grpcio has it (435-439 turns here)."""
    drained, turns = await _turns_to_take_a_burst(drain=False)
    assert not drained
    assert turns >= 200, turns
