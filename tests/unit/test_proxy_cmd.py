"""`meshctl proxy bootstrap`: options, and asking pilot's debug API (a stand-in) for the workload."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from meshctl.cli import cli

WORKLOADS = {
    "/debug/workload/bookinfo/reviews-v2": {
        "namespace": "bookinfo",
        "name": "reviews-v2",
        "address": "127.44.0.7",
        "labels": {"app": "reviews", "version": "v2"},
        "service_account": "bookinfo-reviews",
        "ports": {"http": 9080},
    },
}


def _address() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


class _FakeDebug(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = WORKLOADS.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "application/json" if body else "text/plain")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode() if body else b"no WorkloadEntry\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def debug_addr() -> Iterator[str]:
    server = ThreadingHTTPServer((_address(), 0), _FakeDebug)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"{host!s}:{port}"
    server.shutdown()
    server.server_close()


def _node(output: str) -> dict[str, object]:
    node: dict[str, object] = yaml.safe_load(output)["node"]
    return node


def test_bootstrap_with_address_needs_no_pilot() -> None:
    address = _address()
    args = ["proxy", "bootstrap", "--workload", "shop/cart", "--address", address, "--label", "app=cart",
            "--service-account", "cart", "--pilot", "pilot.mesh:15010", "--debug", "127.0.0.1:1"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    node = _node(result.stdout)
    assert node["id"] == f"sidecar~{address}~cart.shop~shop.svc.cluster.local"
    assert node["metadata"] == {
        "INSTANCE_IPS": address,
        "LABELS": {"app": "cart"},
        "MESHCTL_BIND_ADDRESS": address,
        "NAMESPACE": "shop",
        "SERVICE_ACCOUNT": "cart",
        "WORKLOAD_NAME": "cart",
    }
    assert "pilot.mesh" in result.stdout


@pytest.mark.parametrize(("flags", "env", "api_type"), [
    ([], {}, "DELTA_GRPC"),
    (["--sotw-xds"], {}, "GRPC"),
    ([], {"ISTIO_DELTA_XDS": "false"}, "GRPC"),
    (["--delta-xds"], {"ISTIO_DELTA_XDS": "false"}, "DELTA_GRPC"),
])
def test_bootstrap_speaks_delta_ads_unless_told_otherwise(flags: list[str], env: dict[str, str],
                                                          api_type: str) -> None:
    args = ["proxy", "bootstrap", "--workload", "shop/cart", "--address", _address(), *flags]
    result = CliRunner().invoke(cli, args, env={"ISTIO_DELTA_XDS": None, **env})
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["dynamic_resources"]["ads_config"]["api_type"] == api_type


def test_a_value_of_istio_delta_xds_go_would_not_read_is_a_usage_error_naming_it() -> None:
    args = ["proxy", "bootstrap", "--workload", "shop/cart", "--address", _address()]
    result = CliRunner().invoke(cli, args, env={"ISTIO_DELTA_XDS": "yes"})
    assert result.exit_code == 2
    assert "ISTIO_DELTA_XDS 'yes' is not a boolean" in result.output


def test_bootstrap_asks_pilot_and_cli_labels_win(debug_addr: str, tmp_path: Path) -> None:
    out = tmp_path / "envoy.json"
    args = ["proxy", "bootstrap", "--workload", "bookinfo/reviews-v2", "--debug", debug_addr,
            "--label", "version=canary", "--gateway", "--format", "json", "--output", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    node = json.loads(out.read_text())["node"]
    assert node["id"].startswith("router~127.44.0.7~reviews-v2.bookinfo~")
    assert node["metadata"]["LABELS"] == {"app": "reviews", "version": "canary"}
    assert node["metadata"]["SERVICE_ACCOUNT"] == "bookinfo-reviews"


def test_unknown_workload_is_a_clear_error(debug_addr: str) -> None:
    args = ["proxy", "bootstrap", "--workload", "bookinfo/nope", "--debug", debug_addr]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "knows no workload bookinfo/nope" in result.output
    assert "--address" in result.output


def test_unreachable_pilot_is_a_clear_error() -> None:
    dead = f"{_address()}:9"
    result = CliRunner().invoke(cli, ["proxy", "bootstrap", "--workload", "a/b", "--debug", dead])
    assert result.exit_code == 1
    assert f"cannot reach pilot's debug API at {dead}" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workload", "nonamespace"], "is not namespace/name"),
        (["--workload", "a/b", "--address", "127.0.0.2", "--label", "novalue"], "is not key=value"),
        (["--workload", "a/b", "--address", "10.0.0.1"], "must be loopback"),
        (["--workload", "a/b", "--address", "127.0.0.2", "--pilot", "nope"], "is not host:port"),
    ],
)
def test_bad_options(extra: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["proxy", "bootstrap", *extra])
    assert result.exit_code == 2
    assert message in result.output
