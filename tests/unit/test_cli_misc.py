"""meshctl's plumbing for scripts and shells: `version`, `completion`, `--help` examples, `-o json|yaml`,
exit codes, colour only on a terminal; pilot's `/debug/version` and the admin address in `/debug/syncz`;
and the pure readers behind `proxy-config` and `proxy-status PROXY`.

Commands run in a worker thread (each calls asyncio.run) against a real pilot on loopback, with a
real ADS client standing in for a proxy; the terminal test runs meshctl on a real pseudo-terminal.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pty
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import click
import pytest
import yaml
from click.testing import CliRunner, Result

from meshctl import __version__
from meshctl.cli import cli
from meshctl.config_diff import diff_proxy, endpoint_summary
from meshctl.envoy_dump import (
    ClusterFilter,
    ConfigIndex,
    cluster_rows,
    parse_cluster_name,
    route_rows,
    secret_rows,
)
from meshctl.proxy_config import parse_levels
from pilot.app import Pilot
from pilot.settings import PilotSettings
from pilot.testing.ads_client import AdsClient, make_node
from pilot.xds.typeurls import CLUSTER

MESH = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-1, namespace: default}
spec: {address: 127.0.3.4, labels: {app: ratings}, serviceAccount: ratings}
"""
CLIENT = "sidecar~127.0.3.9~client.default~default.svc.cluster.local"
ANSI = "\x1b["


@pytest.fixture
async def pilot(tmp_path: Path) -> AsyncIterator[Pilot]:
    (tmp_path / "mesh.yaml").write_text(MESH)
    async with Pilot(PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path, file_poll_ms=20)) as p:
        yield p


async def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """`meshctl ARGS` in a thread (its asyncio.run needs a loop of its own), output captured (not a tty)."""
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env, prog_name="meshctl")


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, prog_name="meshctl")


# --- pilot's debug API: version, and where each proxy's Envoy admin is ------------------------------------------------

async def test_debug_version_and_syncz_admin_address(pilot: Pilot) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{pilot.debug_address}/debug/version") as resp:
            assert (await resp.json())["version"] == __version__
        local = make_node(CLIENT, labels={"app": "client"}, workload="client", bind_address="127.0.3.9")
        bare = make_node("sidecar~10.1.2.3~pod-1.shop~shop.svc.cluster.local", namespace="shop", workload="pod-1")
        async with AdsClient(pilot.ads_address, local) as one, AdsClient(pilot.ads_address, bare) as two:
            for client in (one, two):
                client.send(CLUSTER)
                await client.recv()
            async with session.get(f"http://{pilot.debug_address}/debug/syncz") as resp:
                admins = {row["proxy"]: row["admin"] for row in await resp.json()}
    assert admins == {CLIENT: "127.0.3.9:15000", bare.id: None}  # a pod's admin is not reachable from here


# --- version ---

async def test_version_with_a_control_plane_in_every_format(pilot: Pilot) -> None:
    debug = ("--debug", pilot.debug_address)
    text = await invoke("version", *debug)
    assert text.exit_code == 0, text.output
    assert text.output.splitlines() == [
        f"client version: {__version__} (Python {sys.version.split()[0]}, {sys.platform})",
        f"control plane version: {__version__}"]
    as_json = json.loads((await invoke("version", *debug, "-o", "json")).output)
    as_yaml = yaml.safe_load((await invoke("version", *debug, "-o", "yaml")).output)
    assert as_json == as_yaml and as_json["control_plane"]["component"] == "pilot"
    assert (await invoke("version", *debug, "--short")).output.split() == [__version__, __version__]


def test_version_without_a_control_plane_prints_the_client_and_exits_3() -> None:
    result = run("version", "--debug", "127.0.0.1:1")
    assert result.exit_code == 3
    assert result.stdout.startswith(f"client version: {__version__}")
    assert "control plane: cannot reach http://127.0.0.1:1/debug/version" in result.stderr
    only_client = run("version", "--remote=false", "-o", "json", "--debug", "127.0.0.1:1")
    assert only_client.exit_code == 0 and json.loads(only_client.output) == {
        "client": {"version": __version__, "python": sys.version.split()[0], "platform": sys.platform}}
    assert run("--version").output.strip().endswith(__version__)


# --- exit codes and -o -----------------------------------------------------------------------------------------------

async def test_proxy_status_formats_and_exit_codes(pilot: Pilot) -> None:
    debug = ("--debug", pilot.debug_address)
    node = make_node(CLIENT, labels={"app": "client"}, workload="client", bind_address="127.0.3.9")
    async with AdsClient(pilot.ads_address, node) as client:
        client.send(CLUSTER)
        client.ack(await client.recv())
        for _ in range(50):  # until pilot has the ACK
            rows = json.loads((await invoke("proxy-status", *debug, "-o", "json")).output)
            if rows and rows[0]["types"]["CDS"]["state"] == "SYNCED":
                break
            await asyncio.sleep(0.05)
        assert rows[0]["proxy"] == CLIENT and rows[0]["admin"] == "127.0.3.9:15000"
        assert yaml.safe_load((await invoke("proxy-status", *debug, "-o", "yaml")).output)[0]["proxy"] == CLIENT
        assert json.loads((await invoke("proxy-status", *debug, "--json")).output)[0]["proxy"] == CLIENT
        table = await invoke("proxy-status", *debug)
        assert table.exit_code == 0 and "SYNCED" in table.output and CLIENT in table.output
        assert ANSI not in table.output  # not a terminal: no colour codes, whatever the content
        unknown = await invoke("proxy-status", "nobody", *debug)
        assert unknown.exit_code == 2 and "no connected proxy matches 'nobody'" in unknown.output
        assert "default/client" in unknown.output
        no_admin = await invoke("proxy-config", "clusters", "client", *debug, "--admin", "127.0.0.1:1")
        assert no_admin.exit_code == 3 and "cannot reach http://127.0.0.1:1/config_dump" in no_admin.output
    assert (await invoke("proxy-status", "--debug", "127.0.0.1:1")).exit_code == 3
    assert (await invoke("proxy-status", "-o", "xml")).exit_code == 2
    neither = await invoke("proxy-config", "clusters", "--debug", "127.0.0.1:1")  # neither PROXY nor --admin
    assert neither.exit_code == 2


async def test_colours_only_on_a_terminal_and_never_with_no_color(pilot: Pilot) -> None:
    async def on_a_pty(extra_env: dict[str, str]) -> str:
        leader, follower = pty.openpty()
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshctl.cli", "proxy-status", "--debug", pilot.debug_address,
            stdout=follower, stderr=follower, env={**env, "TERM": "xterm-256color", "COLUMNS": "300", **extra_env})
        os.close(follower)
        await asyncio.wait_for(proc.wait(), 60)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        return b"".join(chunks).decode(errors="replace")

    node = make_node(CLIENT, labels={"app": "client"}, workload="client", bind_address="127.0.3.9")
    async with AdsClient(pilot.ads_address, node) as client:
        client.send(CLUSTER)
        await client.recv()
        coloured = await on_a_pty({})
        plain = await on_a_pty({"NO_COLOR": "1"})
    assert CLIENT in coloured and "\x1b[33mSTALE" in coloured  # sent, not ACKed: yellow
    assert CLIENT in plain and "STALE" in plain and "\x1b[33m" not in plain  # NO_COLOR: no colours


# --- completion and help ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("shell", "marker"), [
    ("bash", "complete -o nosort -F _meshctl_completion meshctl"),
    ("zsh", "#compdef meshctl"),
    ("fish", "complete --no-files --command meshctl"),
])
def test_completion_scripts(shell: str, marker: str) -> None:
    result = run("completion", shell)
    assert result.exit_code == 0 and marker in result.output and "_MESHCTL_COMPLETE" in result.output
    assert run("completion", "tcsh").exit_code == 2


def test_completion_protocol_completes_commands_and_options() -> None:
    def complete(words: str) -> list[str]:
        env = {"_MESHCTL_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
        return [line.split(",", 1)[1] for line in run(env=env).output.splitlines()]

    assert complete("meshctl proxy-c") == ["proxy-config"]
    assert set(complete("meshctl proxy-config ")) >= {"clusters", "listeners", "routes", "endpoints", "secrets",
                                                      "bootstrap", "log", "all"}
    assert "--fqdn" in complete("meshctl proxy-config clusters --f")


async def test_completion_of_proxy_names_asks_pilot(pilot: Pilot) -> None:
    node = make_node(CLIENT, labels={"app": "client"}, workload="client")
    async with AdsClient(pilot.ads_address, node) as client:
        client.send(CLUSTER)
        await client.recv()
        words = f"meshctl proxy-status --debug {pilot.debug_address} def"
        env = {"_MESHCTL_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": "4"}
        result = await invoke(env=env)
    assert result.output.splitlines() == ["plain,default/client"]


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in sorted(group.commands.items()):
        out.append((*prefix, name))
        if isinstance(command, click.Group):
            out += _commands(command, (*prefix, name))
    return out


MINE = ("proxy-status", "proxy-config", "version", "completion", "up", "demo")


@pytest.mark.parametrize("path", [p for p in _commands(cli) if p[0] in MINE], ids=" ".join)
def test_help_has_examples(path: tuple[str, ...]) -> None:
    result = run(*path, "--help")
    assert result.exit_code == 0
    examples = result.output.split("Examples:", 1)
    assert len(examples) == 2, result.output
    assert f"meshctl {path[0]}" in examples[1]


# --- the pure readers -------------------------------------------------------------------------------------------------

CDS_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
CLUSTER_CAMEL = {"@type": CDS_TYPE, "name": "outbound|9080|v1|r.d.svc.cluster.local",
                 "type": "EDS", "connectTimeout": "10s", "edsClusterConfig": {"edsConfig": {"ads": {}}}}
CLUSTER_SNAKE = {"@type": CDS_TYPE, "name": "outbound|9080|v1|r.d.svc.cluster.local",
                 "type": "EDS", "connect_timeout": "10s", "eds_cluster_config": {"eds_config": {"ads": {}}}}
CLA = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def _envoy(clusters: list[dict[str, Any]], endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
         "dynamic_active_clusters": [{"version_info": "1", "cluster": c} for c in clusters]},
        {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
         "dynamic_endpoint_configs": [{"endpoint_config": e} for e in endpoints]},
    ]}


def _endpoint(port: int, envoy_defaults: bool) -> dict[str, Any]:
    lb: dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.5", "port_value": port}}},
                          "load_balancing_weight": 1}
    if envoy_defaults:  # what Envoy adds when it rebuilds the assignment from its host set
        lb["health_status"] = "HEALTHY"
        return {"@type": CLA, "cluster_name": CLUSTER_SNAKE["name"], "policy": {"overprovisioning_factor": 140},
                "endpoints": [{"locality": {}, "lb_endpoints": [lb]}]}
    return {"@type": CLA, "clusterName": CLUSTER_SNAKE["name"], "endpoints": [{"lbEndpoints": [
        {"endpoint": {"address": {"socketAddress": {"address": "127.0.0.5", "portValue": port}}},
         "loadBalancingWeight": 1}]}]}


def test_diff_is_empty_across_json_spellings_and_envoys_eds_defaults() -> None:
    pilot = {"CDS": {"version": "a", "resources": [CLUSTER_CAMEL]}, "EDS": {"version": "b", "resources": [
        _endpoint(8080, envoy_defaults=False)]}}
    diffs = diff_proxy(pilot, _envoy([CLUSTER_SNAKE], [_endpoint(8080, envoy_defaults=True)]), {"CDS": "a", "EDS": "b"})
    assert [(d.type, d.in_sync, d.text) for d in diffs] == [("CDS", True, ""), ("EDS", True, "")]


def test_diff_names_changed_missing_and_extra_resources() -> None:
    changed = {**CLUSTER_SNAKE, "connect_timeout": "1s"}
    extra = {**CLUSTER_SNAKE, "name": "outbound|9080|v2|r.d.svc.cluster.local"}
    pilot = {"CDS": {"version": "a", "resources": [CLUSTER_CAMEL]},
             "EDS": {"version": "b", "resources": [_endpoint(8080, envoy_defaults=False)]}}
    cds, eds = diff_proxy(pilot, _envoy([changed, extra], [_endpoint(9090, envoy_defaults=True)]), {})
    assert cds.changed == [CLUSTER_SNAKE["name"]] and cds.only_in_proxy == [extra["name"]] and not cds.in_sync
    assert "-connect_timeout: 10s" in cds.text and "+connect_timeout: 1s" in cds.text
    assert "-- 127.0.0.5:8080 weight=1 priority=0" in eds.text and "+- 127.0.0.5:9090 weight=1 priority=0" in eds.text
    assert endpoint_summary(_endpoint(1, True)) == endpoint_summary(_endpoint(1, False))


def test_diff_of_a_vhds_proxy_merges_its_virtual_hosts_and_names_their_versions() -> None:
    """A VHDS proxy's route configurations are compared with their virtual hosts merged in, as
    Envoy holds them; the RDS line also names the virtual hosts' versions, since a route change
    reaches such a proxy as virtual hosts and leaves the configurations' version as it was."""
    vhost = {"name": "outbound/r:9080", "domains": ["r:9080"], "routes": []}
    vhds: dict[str, Any] = {"config_source": {"ads": {}}}
    pilot = {"RDS": {"version": "rds1", "resources": [{"name": "outbound", "vhds": vhds, "virtual_hosts": []}]},
             "VHDS": {"version": "vh2", "resources": [vhost]}}
    envoy = {"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": [
        {"version_info": "rds1", "route_config": {"name": "outbound", "vhds": vhds, "virtual_hosts": [vhost]}}]}]}
    (rds,) = diff_proxy(pilot, envoy, {"RDS": "rds1", "VHDS": "vh1"})
    assert rds.in_sync and rds.vhds_versions == ("vh2", "vh1")
    assert rds.versions() == "pilot rds1, ACKed rds1; its virtual hosts over VHDS: pilot vh2, ACKed vh1"
    assert rds.as_dict()["vhds_acked_version"] == "vh1"
    (plain,) = diff_proxy({"RDS": pilot["RDS"]}, envoy, {"RDS": "rds1"})
    assert plain.vhds_versions is None and "vhds_pilot_version" not in plain.as_dict() and not plain.in_sync


def test_cluster_rows_read_istio_names_and_destination_rules() -> None:
    index = ConfigIndex.from_configz({"objects": [
        {"kind": "DestinationRule", "namespace": "d", "name": "r", "object": {"spec": {"host": "r"}}},
        {"kind": "VirtualService", "namespace": "d", "name": "vs", "object": {"spec": {"hosts": ["r"]}}}]},
        domain="cluster.local")
    assert index.destination_rules == {"r.d.svc.cluster.local": ("r.d",)}
    assert index.virtual_services == {"r.d.svc.cluster.local": ("vs.d",)}
    dump = _envoy([CLUSTER_SNAKE, {"name": "inbound|8080||", "type": "STATIC"}], [])
    assert cluster_rows(dump, ClusterFilter(), index) == [
        ("-", "8080", "-", "inbound", "STATIC", "-"),
        ("r.d.svc.cluster.local", "9080", "v1", "outbound", "EDS", "r.d")]
    assert cluster_rows(dump, ClusterFilter(direction="inbound", port=8080), index)[0][3] == "inbound"
    assert cluster_rows(dump, ClusterFilter(subset="v2"), index) == []
    assert parse_cluster_name("PassthroughCluster").fqdn == "PassthroughCluster"


def test_route_rows_take_istio_metadata_first() -> None:
    route = {"match": {"prefix": "/api", "headers": [{"name": "end-user"}]},
             "metadata": {"filter_metadata": {"istio": {
                 "config": "/apis/networking.istio.io/v1/namespaces/shop/virtual-service/cart"}}}}
    dump = {"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": [
        {"route_config": {"name": "80", "virtual_hosts": [{"name": "cart.shop.svc.cluster.local:80",
                                                           "domains": ["cart.shop.svc.cluster.local",
                                                                       "cart.shop.svc.cluster.local.", "cart"],
                                                           "routes": [route]}]}}]}]}
    assert route_rows(dump, ConfigIndex()) == [
        ("80", "cart.shop.svc.cluster.local:80", "cart.shop.svc.cluster.local +2 more", "/api* [headers: end-user]",
         "cart.shop")]


def test_parse_levels_reads_envoys_logging_answer() -> None:
    text = "active loggers:\n  admin: info\n  http: debug\n  upstream: trace\n"
    assert parse_levels(text) == {"admin": "info", "http": "debug", "upstream": "trace"}


def test_secret_rows_read_the_certificate_and_judge_validity_by_the_given_clock() -> None:
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    name = x509.Name([])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(0xABC123).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    pem = base64.b64encode(cert.public_bytes(serialization.Encoding.PEM)).decode()
    chain = {"tls_certificate": {"certificate_chain": {"inline_bytes": pem}}}
    roots = {"validation_context": {"trusted_ca": {"inline_bytes": "eA=="}}}
    dump = {"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump", "dynamic_active_secrets": [
        {"name": "default", "secret": {"name": "default", **chain}},
        {"name": "ROOTCA", "secret": {"name": "ROOTCA", **roots}},
    ]}]}
    inside = secret_rows(dump, start + datetime.timedelta(hours=1))
    assert inside == [("ROOTCA", "CA", "ACTIVE", "false", "-", "-", "-"),
                      ("default", "Cert Chain", "ACTIVE", "true", "abc123", "2030-01-02T00:00:00Z",
                       "2030-01-01T00:00:00Z")]
    assert secret_rows(dump, start + datetime.timedelta(days=2), name="default")[0][3] == "false"


def test_pod_of_reads_the_pod_from_a_node_id_and_names_bad_ones() -> None:
    from meshctl.portforward import kubectl_args, pod_of

    assert pod_of("sidecar~10.244.0.9~web-1-abc.shop~shop.svc.cluster.local", "shop") == "web-1-abc"
    with pytest.raises(ValueError, match="names no pod of namespace 'shop'"):
        pod_of("sidecar~10.244.0.9~web-1.other~other.svc.cluster.local", "shop")
    assert kubectl_args("shop", "web-1", Path("/k"), "ctx") == [
        "port-forward", "--namespace", "shop", "pod/web-1", ":15000", "--address", "127.0.0.1",
        "--kubeconfig", "/k", "--context", "ctx"]


LIGHT_PROBE = """
import sys
import click
from meshctl.cli import cli
loaded_at_start = sorted(m for m in sys.modules if m.startswith(("meshctl.", "pilot.", "injector.")))
proxy = cli.get_command(click.Context(cli), "proxy")
run = proxy.get_command(click.Context(proxy), "run")
print(loaded_at_start)
print(run.name, "pilot.api" in sys.modules, "meshctl.analyze" in sys.modules, "aiohttp" in sys.modules)
"""


def test_a_subcommand_imports_only_what_it_needs() -> None:
    """`meshctl proxy run` (one per sidecar) loads neither the API models nor the other commands:
    importing the CLI loads no subcommand, naming `proxy` loads the proxy's modules alone."""
    out = subprocess.run([sys.executable, "-c", LIGHT_PROBE], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.splitlines()
    assert out[0] == "['meshctl.cli', 'meshctl.lazy_group']"
    assert out[1] == "run False False True"  # aiohttp: the proxy talks to Envoy's admin API with it


def test_every_listed_subcommand_loads_under_its_own_name() -> None:
    ctx = click.Context(cli)
    names = cli.list_commands(ctx)
    assert {"proxy", "proxy-status", "proxy-config", "describe", "analyze", "x", "wait"} <= set(names)
    for name in names:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
    assert cli.get_command(ctx, "no-such-command") is None
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2 and "No such command 'no-such-command'" in result.output
