"""`meshctl demo`: a local mesh with a canary release you can watch shift live.

Starts pilot with its CA (Citadel, a fresh one per run in the demo's temp dir), reviews v1/v2/v3
apps and a frontend app, each with a real Envoy sidecar whose workload agent holds its SPIFFE
identity and which gets its config over mutual TLS; the frontend calls reviews through its sidecar.
The route starts 80/20/0 and, halfway through, the demo rewrites the VirtualService file to
0/0/100, as a user would with their editor. A mesh-wide PeerAuthentication makes mutual TLS STRICT,
and the live view shows the caller identity the reviews apps saw (the SPIFFE URI their sidecar put
in `X-Forwarded-Client-Cert`).
Everything runs on one event loop and stops after `duration` seconds or on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import collections
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from meshctl.democonfig import DemoMesh
from meshctl.echoapp import Upstream, start_echo_app
from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings

START_WEIGHTS = (80, 20, 0)
SHIFTED_WEIGHTS = (0, 0, 100)


@dataclass
class Tally:
    """Answers per reviews version in a sliding window, so a shift shows up within seconds."""

    window: float = 3.0
    events: collections.deque[tuple[float, str]] = field(default_factory=collections.deque)
    total: collections.Counter[str] = field(default_factory=collections.Counter)
    callers: collections.Counter[str] = field(default_factory=collections.Counter)  # SPIFFE URIs reviews saw

    def add(self, outcome: str, now: float) -> None:
        self.events.append((now, outcome))
        self.total[outcome] += 1
        while self.events and self.events[0][0] < now - self.window:
            self.events.popleft()

    def recent(self) -> collections.Counter[str]:
        return collections.Counter(o for _, o in self.events)


def render(tally: Tally, versions: Sequence[str], weights: Sequence[int], note: str) -> Group:
    table = Table(title="reviews traffic seen by the frontend", header_style="bold")
    for col in ("version", "route weight", "last 3 s", "share", "total"):
        table.add_column(col, justify="right")
    table.add_column("", min_width=30, no_wrap=True)
    recent = tally.recent()
    n = sum(recent.values()) or 1
    for v, w in zip(versions, weights, strict=True):
        share = recent[v] / n
        bar = "█" * round(share * 30)
        table.add_row(v, f"{w}%", str(recent[v]), f"{share:6.1%}", str(tally.total[v]), bar)
    failed = sum(c for k, c in tally.total.items() if k not in versions)
    return Group(table, f"failed requests: {failed}    {note}", mtls_line(tally))


def mtls_line(tally: Tally) -> str:
    """What mutual TLS looks like from the reviews side: the caller identities their sidecars saw."""
    answered = sum(tally.callers.values())
    if not answered:
        return "mutual TLS STRICT: no answer yet"
    seen = ", ".join(f"{uri or 'no client certificate'} ({n})" for uri, n in tally.callers.most_common())
    return f"mutual TLS STRICT: reviews saw the caller as {seen}"


async def run_demo(duration: float, ads_port: int, debug_port: int, console: Console, tls_port: int = 15012) -> int:
    """Run the demo; returns the number of failed requests (0 is a healthy mesh)."""
    demo = DemoMesh("127.0.10", {v: free_port() for v in ("v1", "v2", "v3")})
    with tempfile.TemporaryDirectory(prefix="meshctl-demo-") as tmp, \
            tempfile.TemporaryDirectory(prefix="meshctl-demo-state-") as state:  # the CA: not in the config dir
        config = Path(tmp)
        (config / "mesh.yaml").write_text(demo.mesh_yaml(strict_mtls=True))
        (config / "route.yaml").write_text(demo.route_yaml(START_WEIGHTS))
        settings = PilotSettings(ads_port=ads_port, xds_tls_port=tls_port, debug_port=debug_port, config_dir=config)
        async with LocalMesh(settings, state_dir=Path(state)) as mesh:
            console.print(f"pilot: xDS {mesh.pilot.ads_address}, xDS and CA over mutual TLS "
                          f"{mesh.pilot.xds_tls_address}, debug http://{mesh.pilot.debug_address}")
            for v in demo.versions:
                await mesh.start_app("default", f"reviews-{v}", v)
            for name in ("frontend", *(f"reviews-{v}" for v in demo.versions)):
                envoy = await mesh.start_sidecar("default", name)
                identity = mesh.agents[f"default/{name}"].identity
                console.print(f"sidecar {name:>10} on {envoy.spec.address} (admin {envoy.admin_url}) as {identity}")
            await mesh.wait_synced()
            upstream = Upstream(f"http://{demo.frontend}:15001", "reviews:9080")
            runner, url = await start_echo_app("frontend", upstream=upstream, call_always=True)
            try:
                return await _drive(url, config, demo, duration, console)
            finally:
                await runner.cleanup()


async def _drive(url: str, config: Path, demo: DemoMesh, duration: float, console: Console) -> int:
    tally, weights = Tally(), START_WEIGHTS
    note = f"route {'/'.join(map(str, weights))}; shifting at {duration / 2:.0f}s"
    start = time.monotonic()
    async with http_session() as session:
        with Live(render(tally, demo.versions, weights, note), console=console, refresh_per_second=4) as live:
            while (elapsed := time.monotonic() - start) < duration:
                if weights == START_WEIGHTS and elapsed >= duration / 2:
                    weights = SHIFTED_WEIGHTS
                    (config / "route.yaml").write_text(demo.route_yaml(weights))
                    note = f"t={elapsed:.0f}s: edited route.yaml to {'/'.join(map(str, weights))}"
                outcome, caller = await _one(session, url)
                tally.add(outcome, time.monotonic())
                if caller is not None:
                    tally.callers[caller] += 1
                live.update(render(tally, demo.versions, weights, note))
    failed = sum(c for k, c in tally.total.items() if k not in demo.versions)
    console.print(f"\ndone: {sum(tally.total.values())} requests, {failed} failed")
    console.print(mtls_line(tally))
    return failed


async def _one(session: object, url: str) -> tuple[str, str | None]:
    """(the reviews version that answered, or what went wrong; the caller URI reviews saw)."""
    try:
        async with session.get(url + "/") as resp:  # type: ignore[attr-defined]
            body = await resp.json()
    except Exception as exc:
        return f"error {type(exc).__name__}", None
    up = body.get("upstream", {})
    if up.get("status") != 200:
        return f"status {up.get('status', up.get('error'))}", None
    headers = {k.lower(): v for k, v in up["body"].get("headers", {}).items()}
    return str(up["body"]["version"]), caller_uri(headers.get("x-forwarded-client-cert", ""))


def caller_uri(xfcc: str) -> str:
    """The `URI=` of the last element of an `X-Forwarded-Client-Cert` value (the hop that called
    this sidecar; elements are appended), "" when there is none (a plaintext caller)."""
    found = _XFCC_URI.findall(xfcc)
    return str(found[-1]) if found else ""


_XFCC_URI = re.compile(r'URI="?([^;,"]+)')


def main(duration: float, ads_port: int, debug_port: int, tls_port: int = 15012) -> int:
    console = Console()
    try:
        return asyncio.run(run_demo(duration, ads_port, debug_port, console, tls_port))
    except KeyboardInterrupt:
        console.print("stopped")
        return 0
