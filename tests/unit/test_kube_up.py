"""The pure parts of `meshctl.kube_up`: the root ConfigMap to write, addresses and names."""

from __future__ import annotations

from typing import Any

import pytest

from meshctl.kube_up import MANAGED_LABEL, ROOT_CERT_KEY, KubeUpSettings, root_cert_configmap, webhook_address


def test_a_new_configmap_has_the_key_and_label_and_no_resource_version() -> None:
    body = root_cert_configmap("shop", "istio-ca-root-cert", "PEM")
    assert body == {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "istio-ca-root-cert", "namespace": "shop", "labels": MANAGED_LABEL},
                    "data": {ROOT_CERT_KEY: "PEM"}}


def test_an_update_keeps_other_keys_and_labels_and_sends_the_resource_version() -> None:
    current: dict[str, Any] = {"metadata": {"name": "istio-ca-root-cert", "namespace": "shop", "resourceVersion": "42",
                            "labels": {"team": "a", "istio.io/config": "false"}},
               "data": {ROOT_CERT_KEY: "OLD", "extra": "kept"}}
    body = root_cert_configmap("shop", "istio-ca-root-cert", "NEW", current)
    assert body["data"] == {ROOT_CERT_KEY: "NEW", "extra": "kept"}
    assert body["metadata"]["labels"] == {"team": "a", **MANAGED_LABEL}
    assert body["metadata"]["resourceVersion"] == "42"
    assert current["data"][ROOT_CERT_KEY] == "OLD"  # not mutated


def test_webhook_address_defaults_by_where_the_control_plane_runs() -> None:
    assert webhook_address(None, in_cluster=True) == ("0.0.0.0", 15017)
    assert webhook_address(None, in_cluster=False) == ("127.0.0.1", 15017)
    assert webhook_address(("10.0.0.1", 9443), in_cluster=True) == ("10.0.0.1", 9443)


def test_webhook_configuration_names_follow_istio_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHCTL_KUBE_INJECTION_WEBHOOK_CONFIG_NAME", raising=False)
    monkeypatch.delenv("MESHCTL_KUBE_VALIDATION_WEBHOOK_CONFIG_NAME", raising=False)
    names = KubeUpSettings()
    assert names.injection_webhook_config_name == "istio-sidecar-injector"
    assert names.validator("mesh") == "istio-validator-mesh"
    monkeypatch.setenv("MESHCTL_KUBE_VALIDATION_WEBHOOK_CONFIG_NAME", "mine")
    assert KubeUpSettings().validator("mesh") == "mine"
