"""Pilot's listeners are exclusive: a second pilot (or demo) on a used address fails at once, in one line.

Real processes (`python -m meshctl.cli up|demo`) and real sockets; the first pilot must keep serving.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client import CollectorRegistry

from meshctl.localmesh import FREE_PORTS_FROM, _ephemeral_low, free_port
from pilot.app import Pilot
from pilot.listen import AddressInUseError
from pilot.settings import PilotSettings
from pilot.testing.ads_client import AdsClient, make_node, resource_names
from pilot.xds.cache import SnapshotCache
from pilot.xds.server import AdsServer
from pilot.xds.status import StatusRegistry, XdsMetrics
from pilot.xds.typeurls import CLUSTER
from tests.unit.test_debug_api import GOOD

MESHCTL = [sys.executable, "-m", "meshctl.cli"]


async def run(*args: str, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*MESHCTL, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:  # it kept running (it shared the port): stop it, and fail
        proc.kill()
        await proc.wait()
        raise AssertionError(f"meshctl {' '.join(args)} did not exit") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.fixture
async def first_pilot(tmp_path: Path) -> AsyncIterator[tuple[str, str, Path]]:
    """A `meshctl up` process serving GOOD; yields its xDS and debug addresses and its config dir."""
    (tmp_path / "mesh.yaml").write_text(GOOD)
    ads, debug = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        *MESHCTL, "up", "--config-dir", str(tmp_path), "--ads", ads, "--debug", debug, "--log-level", "warning",
        "--plaintext-only",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(200):
            if await ready(debug):
                break
            await asyncio.sleep(0.05)
        yield ads, debug, tmp_path
        assert proc.returncode is None, "the first pilot died"
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


async def ready(debug: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://{debug}/ready") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def serves_clusters(ads: str) -> bool:
    """A new proxy connecting to `ads` gets the first pilot's clusters (not an empty config)."""
    node = make_node("sidecar~127.0.3.9~client.default~default.svc.cluster.local", labels={"app": "client"})
    async with AdsClient(ads, node) as client:
        client.send(CLUSTER)
        response = await asyncio.wait_for(client.recv(), 10)
    return "outbound|9080||ratings.default.svc.cluster.local" in resource_names(response)


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


async def test_a_second_up_on_the_same_xds_port_fails_at_once_in_one_line(
    first_pilot: tuple[str, str, Path],
) -> None:
    ads, debug, config = first_pilot
    code, out = await run("up", "--config-dir", str(config), "--ads", ads, "--debug", f"127.0.0.1:{free_port()}",
                          "--plaintext-only")
    line = one_line(out)
    assert code != 0 and ads in line and "address already in use" in line and "xDS" in line
    # Every new connection still reaches the first pilot, several times over.
    for _ in range(6):
        assert await serves_clusters(ads)
    assert await ready(debug)


async def test_a_second_up_on_the_same_debug_port_fails_in_one_line(first_pilot: tuple[str, str, Path]) -> None:
    ads, debug, config = first_pilot
    code, out = await run("up", "--config-dir", str(config), "--ads", f"127.0.0.1:{free_port()}", "--debug", debug,
                          "--plaintext-only")
    line = one_line(out)
    assert code != 0 and debug in line and "address already in use" in line and "debug" in line
    assert "Traceback" not in out and "Event loop is closed" not in out
    assert await ready(debug) and await serves_clusters(ads)


async def test_demo_on_a_used_port_fails_in_one_line(first_pilot: tuple[str, str, Path]) -> None:
    ads, debug, _ = first_pilot
    ads_port, debug_port = ads.rsplit(":", 1)[1], debug.rsplit(":", 1)[1]
    code, out = await run("demo", "--ads-port", ads_port, "--debug-port", str(free_port()), "--duration", "1",
                          "--xds-tls-port", "0")
    line = one_line(out)
    assert code != 0 and ads in line and "address already in use" in line
    code, out = await run("demo", "--ads-port", str(free_port()), "--debug-port", debug_port, "--duration", "1",
                          "--xds-tls-port", "0")
    line = one_line(out)
    assert code != 0 and debug in line and "address already in use" in line
    assert await ready(debug) and await serves_clusters(ads)


async def test_the_xds_listener_is_exclusive_even_to_a_server_asking_to_share() -> None:
    """gRPC servers share a port when both set SO_REUSEPORT (gRPC's default); pilot's does not."""
    ads = AdsServer(SnapshotCache(), StatusRegistry(XdsMetrics(CollectorRegistry())))
    port = await ads.start("127.0.0.1", 0)
    other = grpc.aio.server()  # SO_REUSEPORT on, as the second pilot had before
    try:
        with pytest.raises(RuntimeError):
            other.add_insecure_port(f"127.0.0.1:{port}")
        with pytest.raises(AddressInUseError, match=f"127.0.0.1:{port}: address already in use"):
            await AdsServer(ads.cache, ads.status).start("127.0.0.1", port)
    finally:
        await other.stop(None)
        await ads.stop()


async def test_pilot_start_on_a_taken_address_raises_before_loading_config(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(GOOD)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        pilot = Pilot(PilotSettings(ads_port=0, debug_port=taken, config_dir=tmp_path))
        with pytest.raises(AddressInUseError) as caught:
            await pilot.start()
        assert caught.value.what == "the debug API" and caught.value.port == taken
        assert pilot.store.revision == 0 and pilot.ads_port == 0  # nothing was loaded or bound
    # Free again: the same settings start (nothing of the failed attempt holds an address).
    async with Pilot(PilotSettings(ads_port=0, debug_port=taken, config_dir=tmp_path)) as p:
        assert p.debug_port == taken


async def test_demo_whose_sidecar_address_is_taken_fails_in_one_error_line() -> None:
    """As when another demo runs: its frontend sidecar's admin address (127.0.10.10:15000) is taken."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.10.10", 15000))
            holder.listen()
        except OSError as exc:  # a real demo holds it right now: the same situation
            assert exc.errno == errno.EADDRINUSE
        code, out = await run("demo", "--ads-port", "0", "--debug-port", "0", "--xds-tls-port", "0", "--duration", "1")
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert code != 0 and len(errors) == 1 and "127.0.10.10:15000 is already in use" in errors[0], out
    assert "Traceback" not in out and "Event loop is closed" not in out


def test_free_ports_lie_below_the_range_outgoing_connections_take_theirs_from(tmp_path: Path) -> None:
    """An outgoing connection's local port comes from the ephemeral range; `free_port` stays out of it."""
    low = _ephemeral_low()
    assert low > FREE_PORTS_FROM + 1_000, low  # Linux's default starts at 32768
    ports = {free_port() for _ in range(20)}
    assert all(FREE_PORTS_FROM <= p < low for p in ports), ports
    # A real outgoing connection's local port.
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        assert client.getsockname()[1] >= low
    with socket.socket() as s:  # what it returns can be bound
        s.bind(("127.0.0.1", free_port()))
    odd = tmp_path / "range"
    odd.write_text("1024\t65535\n")
    assert _ephemeral_low(odd) == 1024
    assert _ephemeral_low(tmp_path / "missing") == 0


def test_a_port_handed_out_is_not_handed_out_again_before_it_is_bound(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Callers pick an app's port and then pilot's before binding either: two draws of the same
    free port would make one of them fail with "address already in use" (seen once in CI)."""
    from meshctl import localmesh

    monkeypatch.setattr(localmesh, "_claims_dir", lambda: tmp_path)
    # Two ports free right now: fixed ones may be held by a server of a test running in parallel
    # (seen once in CI: the draw then skipped it and ran out of scripted draws).
    first, second = _free_now(FREE_PORTS_FROM + 7, 2)
    draws = iter([first, first, second])
    monkeypatch.setattr(random, "randrange", lambda *_: next(draws))  # the module localmesh draws from
    monkeypatch.setattr(localmesh, "_HANDED_OUT", collections.deque(maxlen=4))
    assert [free_port(), free_port()] == [first, second]


def _free_now(start: int, count: int) -> list[int]:
    """The first `count` ports from `start` on that 127.0.0.1 can bind now."""
    found: list[int] = []
    port = start
    while len(found) < count:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                pass
            else:
                found.append(port)
        port += 1
    return found


def test_processes_drawing_at_once_never_get_the_same_port(tmp_path: Path) -> None:
    """Parallel test workers (or two demos) pick ports at the same time and bind them later: three
    real processes drawing 300 ports each get 900 different ones. Drawn at random from ~12,000
    ports with nothing shared between processes, about 30 would coincide."""
    draw = "from meshctl.localmesh import free_port; print(*(free_port() for _ in range(300)))"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the claims live under the temp directory
    procs = [subprocess.Popen([sys.executable, "-c", draw], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    drawn = [int(p) for proc in procs for p in proc.communicate(timeout=120)[0].split()]
    assert all(proc.returncode == 0 for proc in procs)
    assert len(drawn) == 900 and len(set(drawn)) == 900, sorted(p for p in set(drawn) if drawn.count(p) > 1)


def test_a_claim_older_than_its_time_is_taken_over_and_a_fresh_one_is_not(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A port claimed by a process long gone is usable again; one claimed just now is not."""
    from meshctl import localmesh

    monkeypatch.setattr(localmesh, "_claims_dir", lambda: tmp_path)
    old, fresh = FREE_PORTS_FROM + 11, FREE_PORTS_FROM + 12
    (tmp_path / str(old)).touch()
    (tmp_path / str(fresh)).touch()
    long_ago = time.time() - localmesh.CLAIM_SECONDS - 60
    os.utime(tmp_path / str(old), (long_ago, long_ago))
    assert localmesh._claim(old) is True
    assert time.time() - (tmp_path / str(old)).stat().st_mtime < 60  # claimed anew, now
    assert localmesh._claim(fresh) is False
    assert localmesh._claim(old) is False  # and now it is this claim that holds
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(old), str(fresh)]  # nothing left behind
