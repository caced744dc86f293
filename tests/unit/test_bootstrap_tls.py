"""The bootstrap of a sidecar with a workload agent: `sds-grpc`, mutual TLS to pilot, and Envoy accepts it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from pilot.bootstrap import (
    PILOT_SAN,
    ROOT_SECRET,
    SDS_CLUSTER,
    WORKLOAD_SECRET,
    XDS_CLUSTER,
    BootstrapError,
    BootstrapSpec,
    render,
    sidecar_bootstrap,
)
from pilot.model.proxy import identity_from_node
from tests.unit.test_bootstrap import _envoy_path, _spec


def _clusters(spec: BootstrapSpec) -> dict[str, object]:
    return {c.name: c for c in sidecar_bootstrap(spec).static_resources.clusters}


def test_the_agent_adds_the_sds_cluster_on_its_socket_and_says_so_in_the_node() -> None:
    spec = _spec(sds_socket="/tmp/meshctl-sds-x/sds.sock")
    sds = _clusters(spec)[SDS_CLUSTER]
    assert sds.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path == spec.sds_socket  # type: ignore[attr-defined]
    options = http_protocol_options_pb2.HttpProtocolOptions()
    sds.typed_extension_protocol_options[  # type: ignore[attr-defined]
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    assert identity_from_node(sidecar_bootstrap(spec).node).proxy_class.mtls
    assert not identity_from_node(sidecar_bootstrap(_spec()).node).proxy_class.mtls
    assert not _clusters(spec)[XDS_CLUSTER].HasField("transport_socket")  # type: ignore[attr-defined]


def test_pilot_tls_presents_default_and_checks_pilot_against_rootca() -> None:
    spec = _spec(sds_socket="/tmp/s.sock", pilot_tls=True, pilot_port=15012)
    xds = _clusters(spec)[XDS_CLUSTER]
    context = tls_pb2.UpstreamTlsContext()
    xds.transport_socket.typed_config.Unpack(context)  # type: ignore[attr-defined]
    common = context.common_tls_context
    assert context.sni == PILOT_SAN
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == [WORKLOAD_SECRET]
    sds = common.tls_certificate_sds_secret_configs[0].sds_config.api_config_source
    assert sds.grpc_services[0].envoy_grpc.cluster_name == SDS_CLUSTER
    validation = common.combined_validation_context
    assert validation.validation_context_sds_secret_config.name == ROOT_SECRET
    (san,) = validation.default_validation_context.match_typed_subject_alt_names
    assert san.matcher.exact == PILOT_SAN and san.san_type == san.DNS
    assert list(common.alpn_protocols) == ["h2"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pilot_tls": True}, "pilot_tls needs sds_socket"),
        ({"sds_socket": "/" + "x" * 120}, "sds_socket"),
        ({"sds_socket": "/s.sock", "pilot_tls": True, "pilot_san": ""}, "pilot_san"),
    ],
)
def test_bad_tls_spec_names_the_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(BootstrapError, match=message):
        _spec(**overrides)


@pytest.mark.parametrize("kind", ["sidecar", "router"])
def test_real_envoy_validates_the_tls_bootstrap(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "envoy.yaml"
    spec = _spec(kind=kind, sds_socket=str(tmp_path / "sds.sock"), pilot_tls=True, pilot_port=15012)
    path.write_text(render(sidecar_bootstrap(spec)))
    result = subprocess.run([_envoy_path(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
