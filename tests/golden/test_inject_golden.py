"""Golden tests for sidecar injection, both paths from one golden set (as Istio's injection tests).

Each `inject/<case>.yaml` is Kubernetes YAML; `inject/<case>.golden.yaml` is what `meshctl
kube-inject -f <case>.yaml` prints. The webhook path is checked against the same goldens: every
Pod of the input is sent to the admission handler as an AdmissionReview, the returned JSONPatch is
applied to the pod, and the result must equal the golden's pod. Regenerate with
`pytest tests/golden/test_inject_golden.py --update-goldens` and review the diff.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from click.testing import CliRunner

from injector.webhook import Webhooks
from meshctl.cli import cli

CASES = Path(__file__).parent / "inject"
# Fixed settings: goldens must not change with the package version or the environment.
ENV = {"MESHCTL_INJECT_PROXY_IMAGE": "meshctl/proxy:test"}


def inputs() -> list[Path]:
    return sorted(p for p in CASES.glob("*.yaml") if not p.name.endswith(".golden.yaml"))


def kube_inject(path: Path) -> str:
    result = CliRunner().invoke(cli, ["kube-inject", "-f", str(path)], env=ENV, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def pods(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, dict) and doc.get("kind") == "Pod":
        return [doc]
    if isinstance(doc, dict) and doc.get("kind") == "List":
        return [p for item in doc.get("items") or [] for p in pods(item)]
    return []


def through_webhook(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod as the API server stores it after our mutating webhook answered."""
    from injector.settings import InjectSettings

    webhooks = Webhooks(InjectSettings(proxy_image=ENV["MESHCTL_INJECT_PROXY_IMAGE"]))
    request = {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
               "namespace": pod["metadata"].get("namespace", "default"), "object": pod}
    response = asyncio.run(webhooks.review_pod(request))["response"]
    assert response["allowed"] is True, response
    if "patch" not in response:
        return pod
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, ops)
    return patched


def test_every_golden_has_an_input(update_goldens: bool) -> None:
    stale = [g for g in CASES.glob("*.golden.yaml") if not g.with_name(g.name.replace(".golden", "")).exists()]
    if update_goldens:
        for golden in stale:
            golden.unlink()
    assert update_goldens or not stale, f"goldens without an input: {sorted(g.name for g in stale)}"


@pytest.mark.parametrize("case", inputs(), ids=lambda p: p.stem)
def test_kube_inject_matches_golden(case: Path, update_goldens: bool) -> None:
    golden = case.with_name(f"{case.stem}.golden.yaml")
    out = kube_inject(case)
    if update_goldens:
        golden.write_text(out)
        return
    assert golden.exists(), f"{case.name}: no golden; run with --update-goldens"
    assert out == golden.read_text(), f"{case.name}: kube-inject output differs from {golden.name}"


@pytest.mark.parametrize("case", inputs(), ids=lambda p: p.stem)
def test_webhook_patch_gives_the_golden_pods(case: Path) -> None:
    golden = case.with_name(f"{case.stem}.golden.yaml")
    given = [p for doc in yaml.safe_load_all(case.read_text()) for p in pods(doc)]
    expected = [p for doc in yaml.safe_load_all(golden.read_text()) for p in pods(doc)]
    assert len(given) == len(expected)
    for pod, want in zip(given, expected, strict=True):
        assert through_webhook(pod) == want, f"{case.name}: webhook result for {pod['metadata']['name']}"


def test_injecting_the_goldens_again_changes_nothing(tmp_path: Path) -> None:
    for case in inputs():
        golden = case.with_name(f"{case.stem}.golden.yaml")
        again = tmp_path / golden.name
        again.write_text(golden.read_text())
        assert kube_inject(again) == golden.read_text(), f"{golden.name}: re-injection changed it"
