"""The injected sidecar's identity from its pod's environment, and its Envoy bootstrap (pure)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from envoy.config.core.v3 import config_source_pb2
from google.protobuf import json_format

from meshctl.cli import cli
from meshctl.kube_pod import PodEnvError, parse_labels_file, pod_bootstrap, pod_from_env
from pilot.bootstrap import ADMIN_PORT, HEALTH_LISTENER, HEALTH_PORT, STATS_LISTENER, STATS_PORT
from pilot.model.proxy import META_BIND_ADDRESS, ProxyKind, identity_from_node

ENV = {
    "POD_NAME": "reviews-v1-5d8f-x2x9k", "POD_NAMESPACE": "shop", "INSTANCE_IP": "10.244.1.7",
    "SERVICE_ACCOUNT": "reviews", "CA_ADDR": "istiod.istio-system.svc:15012", "TRUST_DOMAIN": "example.org",
    "PROXY_CONFIG": '{"discoveryAddress":"istiod.istio-system.svc:15012","statusPort":15020}',
    "ISTIO_META_INTERCEPTION_MODE": "REDIRECT", "ISTIO_META_WORKLOAD_NAME": "reviews-v1",
    "ISTIO_META_CLUSTER_ID": "Kubernetes", "ISTIO_METAJSON_EXTRA": '{"a": 1}', "PATH": "/usr/bin",
}
LABELS = 'app="reviews"\nversion="v1"\nquote="a \\"b\\""\n'


def test_pod_from_env_reads_istios_variables_and_labels_file() -> None:
    pod = pod_from_env(ENV, LABELS)
    assert pod.node_id == "sidecar~10.244.1.7~reviews-v1-5d8f-x2x9k.shop~shop.svc.cluster.local"
    assert (pod.namespace, pod.service_account, pod.workload_name, pod.trust_domain) == (
        "shop", "reviews", "reviews-v1", "example.org")
    assert pod.labels == {"app": "reviews", "version": "v1", "quote": 'a "b"'}
    assert pod.metadata == {"INTERCEPTION_MODE": "REDIRECT", "WORKLOAD_NAME": "reviews-v1",
                            "CLUSTER_ID": "Kubernetes", "EXTRA": {"a": 1}}
    assert (pod.discovery_address, pod.ca_address, pod.status_port) == (
        "istiod.istio-system.svc:15012", "istiod.istio-system.svc:15012", 15020)


def test_flags_override_the_environment_and_defaults_fill_the_rest() -> None:
    env = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1"}
    pod = pod_from_env(env, None, {"pod_ip": "10.0.0.9", "discovery_address": "10.0.0.2:15012",
                                   "service_account": "sa", "trust_domain": "td.local"})
    assert (pod.pod_ip, pod.discovery_address, pod.ca_address, pod.service_account, pod.trust_domain) == (
        "10.0.0.9", "10.0.0.2:15012", "10.0.0.2:15012", "sa", "td.local")
    assert pod_from_env(env).discovery_address == "istiod.istio-system.svc:15012"
    assert pod_from_env({**env, "PILOT_ADDRESS": "pilot:15012"}).discovery_address == "pilot:15012"
    assert pod_from_env(env).service_account == "default"


@pytest.mark.parametrize(("env", "message"), [
    ({"POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1"}, "POD_NAME is not set"),
    ({"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "pod"}, "INSTANCE_IP 'pod' is not an IP"),
    ({"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1", "CA_ADDR": "nohost"},
     "CA_ADDR 'nohost' is not host:port"),
    ({"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1", "PROXY_CONFIG": "[1]"},
     "PROXY_CONFIG: must be a ProxyConfig"),
    ({"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1", "PROXY_CONFIG": '{"statusPort": "x"}'},
     "statusPort 'x'"),
    ({"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1", "ISTIO_METAJSON_LABELS": "{"},
     "ISTIO_METAJSON_LABELS: not JSON"),
    ({"POD_NAME": "p", "POD_NAMESPACE": "Bad_NS", "INSTANCE_IP": "10.0.0.1"}, "namespace 'Bad_NS' is not a valid"),
    ({"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1", "ISTIO_DELTA_XDS": "no"},
     "ISTIO_DELTA_XDS 'no' is not a boolean"),
    ({"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1",
      "PROXY_CONFIG": '{"proxyMetadata": {"ISTIO_DELTA_XDS": "maybe"}}'},
     "proxyMetadata.ISTIO_DELTA_XDS 'maybe' is not a boolean"),
])
def test_bad_environment_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(PodEnvError, match=message):
        pod_from_env(env)


def test_labels_file_rejects_a_line_without_value() -> None:
    with pytest.raises(PodEnvError, match="labels file line 2"):
        parse_labels_file('a="b"\nnonsense\n')


def test_bootstrap_is_a_captured_sidecar_on_the_pod_ip() -> None:
    pod = pod_from_env(ENV, LABELS)
    bootstrap = pod_bootstrap(pod, "/var/run/secrets/workload-spiffe-uds/socket")
    assert bootstrap.node.id == pod.node_id
    assert bootstrap.node.cluster == "reviews-v1.shop"
    meta = json_format.MessageToDict(bootstrap.node.metadata)
    assert META_BIND_ADDRESS not in meta
    assert (meta["INSTANCE_IPS"], meta["NAME"], meta["NAMESPACE"], meta["SERVICE_ACCOUNT"]) == (
        "10.244.1.7", "reviews-v1-5d8f-x2x9k", "shop", "reviews")
    assert meta["LABELS"] == {"app": "reviews", "version": "v1", "quote": 'a "b"'}
    assert bootstrap.admin.address.socket_address.address == "127.0.0.1"
    assert bootstrap.admin.address.socket_address.port_value == ADMIN_PORT
    listeners = {lst.name: lst.address.socket_address for lst in bootstrap.static_resources.listeners}
    assert (listeners[HEALTH_LISTENER].address, listeners[HEALTH_LISTENER].port_value) == ("0.0.0.0", HEALTH_PORT)
    assert (listeners[STATS_LISTENER].address, listeners[STATS_LISTENER].port_value) == ("0.0.0.0", STATS_PORT)
    xds = next(c for c in bootstrap.static_resources.clusters if c.name == "xds-grpc")
    assert xds.HasField("transport_socket")  # mutual TLS to pilot
    # Pilot reads it as a captured (iptables) sidecar, not a local-mesh one.
    identity = identity_from_node(bootstrap.node)
    assert identity.proxy_class.kind == ProxyKind.SIDECAR
    assert identity.proxy_class.bind_address is None
    assert identity.proxy_class.captured
    assert identity.proxy_class.mtls


def test_bootstrap_is_deterministic_and_ipv6_binds_all_v6() -> None:
    pod = pod_from_env({**ENV, "INSTANCE_IP": "fd00::7"}, LABELS)
    first = json_format.MessageToJson(pod_bootstrap(pod, "/s"), sort_keys=True)
    assert first == json_format.MessageToJson(pod_bootstrap(pod, "/s"), sort_keys=True)
    listeners = json.loads(first)["staticResources"]["listeners"]
    assert {lst["address"]["socketAddress"]["address"] for lst in listeners} == {"::"}


def _ads_type(env: dict[str, str], overrides: dict[str, str | None] | None = None) -> str:
    bootstrap = pod_bootstrap(pod_from_env(env, LABELS, overrides), "/s")
    return str(config_source_pb2.ApiConfigSource.ApiType.Name(bootstrap.dynamic_resources.ads_config.api_type))


def test_delta_ads_unless_istio_delta_xds_says_false_in_the_environment_or_proxy_metadata() -> None:
    assert _ads_type(ENV) == "DELTA_GRPC"  # Istio's default since 1.22
    assert _ads_type({**ENV, "ISTIO_DELTA_XDS": "false"}) == "GRPC"
    assert _ads_type({**ENV, "ISTIO_DELTA_XDS": "0"}) == "GRPC"
    in_config = {**ENV, "PROXY_CONFIG": json.dumps({"proxyMetadata": {"ISTIO_DELTA_XDS": "false"}})}
    assert _ads_type(in_config) == "GRPC"
    assert _ads_type({**in_config, "ISTIO_DELTA_XDS": "true"}) == "DELTA_GRPC"  # the variable wins
    assert _ads_type({**ENV, "ISTIO_DELTA_XDS": "false"}, {"delta_xds": "true"}) == "DELTA_GRPC"  # then the flag


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--kubernetes"], {}, "POD_NAME is not set (the injected container gets it from the downward API); "
                           "or pass --workload NS/POD"),
    (["--kubernetes", "--gateway"], {}, "--gateway and --plaintext do not apply"),
    (["--workload", "a/b", "--sds-socket-dir", "/tmp"], {}, "--sds-socket-dir apply only with --kubernetes"),
    (["--address", "127.0.0.1"], {}, "Missing option '--workload'"),
    (["--kubernetes", "--workload", "nopod"], {}, "'nopod' is not namespace/pod"),
    (["--kubernetes", "--label", "novalue"], {}, "'novalue' is not key=value"),
    (["--kubernetes"], {"POD_NAME": "p", "POD_NAMESPACE": "n", "INSTANCE_IP": "10.0.0.1",
                        "ISTIO_KUBE_APP_PROBERS": '{"/x": {}}'}, "ISTIO_KUBE_APP_PROBERS: path '/x'"),
])
def test_run_kubernetes_usage_errors(args: list[str], env: dict[str, str], message: str) -> None:
    clean = {k: None for k in ("POD_NAME", "POD_NAMESPACE", "INSTANCE_IP", "ISTIO_KUBE_APP_PROBERS")}
    result = CliRunner().invoke(cli, ["proxy", "run", *args], env={**clean, **env})
    assert result.exit_code == 2, result.output
    assert message in result.output
