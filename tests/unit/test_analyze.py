"""`meshctl analyze` and `pilot.analysis`: exit codes, output forms, suppression, namespaces, the
secret store, a real pilot's /debug/configz, match covering, determinism and robustness."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshctl.analyze import EXIT_FOUND_ISSUES
from meshctl.cli import cli
from pilot.analysis import CHECKS, Level, analyze, messages
from pilot.analysis.load import Collector, add_text, from_documents
from pilot.analysis.matches import covers
from pilot.api.virtual_service import HTTPMatchRequest
from pilot.app import Pilot
from pilot.settings import PilotSettings

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-1, namespace: default}
spec: {address: 127.0.3.4, labels: {app: reviews}}
"""
DANGLING = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: ratings}}]
"""
WARNING_ONLY = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ghost, namespace: default}
spec: {host: ghost}
"""


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["analyze", *args], input=stdin, catch_exceptions=False)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_clean_config_exits_0(tmp_path: Path) -> None:
    result = run("-f", write(tmp_path, "ok.yaml", SERVICE))
    assert result.exit_code == 0, result.output
    assert result.output == "No validation issues found.\n"


def test_an_error_exits_79_and_names_resource_field_and_fix(tmp_path: Path) -> None:
    result = run("-f", write(tmp_path, "vs.yaml", SERVICE + "---\n" + DANGLING))
    assert result.exit_code == EXIT_FOUND_ISSUES == 79
    line, = result.output.splitlines()
    assert line.startswith("Error [IST0101] (VirtualService default/reviews ")
    assert "vs.yaml[2]) spec.http[0].route[0].destination.host: " in line
    assert 'Referenced host not found: "ratings.default.svc.cluster.local"' in line and ". Fix: " in line


def test_failure_threshold_decides_the_exit_code(tmp_path: Path) -> None:
    path = write(tmp_path, "dr.yaml", WARNING_ONLY)
    assert run("-f", path).exit_code == 0  # a warning is below the default threshold (Error)
    assert run("-f", path, "--failure-threshold", "Warning").exit_code == EXIT_FOUND_ISSUES
    quiet = run("-f", path, "--output-threshold", "Error")
    assert quiet.exit_code == 0 and quiet.output == "No validation issues found.\n"


def test_usage_and_io_errors(tmp_path: Path) -> None:
    assert run().exit_code == 2  # nothing to analyze
    assert run("-f", write(tmp_path, "x.yaml", SERVICE), "-o", "xml").exit_code == 2
    bad = run("-f", write(tmp_path, "x.yaml", SERVICE), "--suppress", "IST0101")
    assert bad.exit_code == 2 and "CODE=Kind" in bad.output
    missing = run("-f", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 1 and "nope.yaml: no such file or directory" in missing.output
    unreachable = run("--debug", "127.0.0.1:9")  # discard port: nothing listens
    assert unreachable.exit_code == 3 and "cannot read pilot's config" in unreachable.output
    no_cluster = run("--k8s", "--kubeconfig", str(tmp_path / "no-kubeconfig"))
    assert no_cluster.exit_code == 3 and "cannot read the cluster" in no_cluster.output


def test_json_and_yaml_output(tmp_path: Path) -> None:
    path = write(tmp_path, "vs.yaml", SERVICE + "---\n" + DANGLING + "---\n" + WARNING_ONLY)
    as_json = json.loads(run("-f", path, "-o", "json").output)
    assert [(m["code"], m["level"], m["kind"], m["resourceName"]) for m in as_json] == [
        ("IST0174", "Warning", "DestinationRule", "ghost"), ("IST0101", "Error", "VirtualService", "reviews")]
    assert set(as_json[0]) == {"code", "name", "level", "kind", "namespace", "resourceName", "path", "message",
                               "fix", "origin"}
    assert yaml.safe_load(run("-f", path, "-o", "yaml").output) == as_json
    assert json.loads(run("-f", write(tmp_path, "ok.yaml", SERVICE), "-o", "json").output) == []


def test_suppress_by_flag_and_by_annotation(tmp_path: Path) -> None:
    path = write(tmp_path, "vs.yaml", SERVICE + "---\n" + DANGLING)
    for rule in ("IST0101=VirtualService default/reviews", "ReferencedResourceNotFound=VirtualService reviews.default",
                 "IST01*=VirtualService *"):
        assert run("-f", path, "--suppress", rule).exit_code == 0, rule
    assert run("-f", path, "--suppress", "IST0101=VirtualService other/*").exit_code == EXIT_FOUND_ISSUES
    annotated = DANGLING.replace("namespace: default}",
                                 "namespace: default, annotations: {galley.istio.io/analyze-suppress: IST0101}}")
    assert run("-f", write(tmp_path, "a.yaml", SERVICE + "---\n" + annotated)).exit_code == 0


def test_namespace_filter_directory_and_stdin(tmp_path: Path) -> None:
    write(tmp_path / "cfg", "svc.yaml", SERVICE)
    write(tmp_path / "cfg", "sub/vs.yaml", DANGLING)
    write(tmp_path / "cfg", "notes.txt", "not: yaml: read")
    whole = run("-f", str(tmp_path / "cfg"))
    assert whole.exit_code == EXIT_FOUND_ISSUES and "sub/vs.yaml[0]" in whole.output
    assert run("-f", str(tmp_path / "cfg"), "-n", "other").output == "No validation issues found in namespace other.\n"
    piped = run("-f", "-", stdin=SERVICE + "---\n" + DANGLING)
    assert piped.exit_code == EXIT_FOUND_ISSUES and "<stdin>[2]" in piped.output


def test_state_dir_secret_store_is_checked(tmp_path: Path) -> None:
    gateway = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: [shop.example.com]
    tls: {mode: SIMPLE, credentialName: shop-cert}
"""
    path = write(tmp_path, "gw.yaml", gateway)
    assert "IST0161" not in run("-f", path).output  # no secret store given: not judged
    state = tmp_path / "state"
    (state / "secrets" / "default").mkdir(parents=True)
    assert "IST0161" in run("-f", path, "--state-dir", str(state)).output
    write(state / "secrets" / "default" / "shop-cert", "tls.crt", "-----BEGIN CERTIFICATE-----\n")
    assert "IST0161" not in run("-f", path, "--state-dir", str(state)).output


@pytest.fixture
async def pilot(tmp_path: Path) -> AsyncIterator[Pilot]:
    (tmp_path / "mesh.yaml").write_text(SERVICE + "---\n" + DANGLING)
    (tmp_path / "bad.yaml").write_text(DANGLING.replace("name: reviews,", "name: broken,").replace(
        "route: [", "route: [{destination: {host: reviews}, weight: -5}, "))
    async with Pilot(PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path, file_poll_ms=20)) as p:
        yield p


async def test_debug_analyzes_what_a_running_pilot_serves(pilot: Pilot, tmp_path: Path) -> None:
    result = await asyncio.to_thread(run, "--debug", pilot.debug_address, "-o", "json")
    assert result.exit_code == EXIT_FOUND_ISSUES, result.output
    found = {(m["code"], m["kind"], m["resourceName"], m["origin"].split(":")[0]) for m in json.loads(result.output)}
    assert ("IST0101", "VirtualService", "reviews", "pilot") in found  # a served object with a dangling host
    assert ("IST0106", "VirtualService", "broken", "pilot") in found  # a document pilot rejected
    # A file overrides pilot's object of the same name: "what if I applied this?"
    fixed = write(tmp_path / "fix", "vs.yaml", DANGLING.replace("host: ratings", "host: reviews"))
    again = await asyncio.to_thread(run, "--debug", pilot.debug_address, "-f", fixed, "-o", "json")
    assert ("IST0101", "VirtualService", "reviews") not in {
        (m["code"], m["kind"], m["resourceName"]) for m in json.loads(again.output)}


def match(**fields: Any) -> HTTPMatchRequest:
    return HTTPMatchRequest.model_validate(fields)


def test_covers_is_conservative() -> None:
    assert covers(match(), match(uri={"exact": "/a"}))
    assert covers(match(uri={"prefix": "/api"}), match(uri={"exact": "/api/v1"}))
    assert covers(match(uri={"prefix": "/api"}), match(uri={"prefix": "/api/v2"}, method={"exact": "GET"}))
    assert not covers(match(uri={"prefix": "/api/v2"}), match(uri={"prefix": "/api"}))
    assert not covers(match(uri={"regex": "/a.*"}), match(uri={"exact": "/ab"}))  # regexes: equality only
    assert covers(match(headers={"x": {"exact": "1"}}), match(headers={"x": {"exact": "1"}, "y": {"exact": "2"}}))
    assert not covers(match(headers={"x": {"exact": "1"}}), match())
    assert not covers(match(gateways=["a"]), match())  # limited to one gateway: not a match on the others
    assert covers(match(gateways=["a", "b"]), match(gateways=["a"]))
    assert not covers(match(uri={"prefix": "/A"}, ignoreUriCase=True), match(uri={"prefix": "/A"}))


def test_output_is_sorted_and_independent_of_document_order() -> None:
    docs = [*yaml.safe_load_all(SERVICE + "---\n" + DANGLING + "---\n" + WARNING_ONLY)]
    named = [(d, f"doc-{d['metadata']['name']}") for d in docs]
    first = analyze(from_documents(named))
    shuffled = list(named)
    random.Random(7).shuffle(shuffled)
    assert analyze(from_documents(reversed(named))) == first == analyze(from_documents(shuffled))
    assert first == sorted(first, key=messages.Message.sort_key) and len(first) == 2


def test_a_failing_check_becomes_an_internal_error_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: object) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setitem(CHECKS, "vs-host-not-found", (CHECKS["vs-host-not-found"][0], broken))
    found = analyze(from_documents([(d, "x") for d in yaml.safe_load_all(SERVICE + "---\n" + WARNING_ONLY)]))
    assert sorted((m.type.code, m.level) for m in found) == [("IST0001", Level.ERROR), ("IST0174", Level.WARNING)]
    assert any("vs-host-not-found" in m.text and "boom" in m.text for m in found)


def test_codes_are_stable_and_unique() -> None:
    codes = [t.code for t in messages.CATALOG]
    assert len(codes) == len(set(codes))
    assert all(c.startswith(("IST0", "MSH0")) and len(c) == 7 for c in codes)
    # Istio's meaning of the codes used here (names from Istio's messages.yaml).
    assert messages.message_type("IST0101") == messages.REFERENCED_RESOURCE_NOT_FOUND
    assert messages.message_type("VirtualServiceIneffectiveMatch") == messages.VS_INEFFECTIVE_MATCH
    subset = messages.message_type("IST0173")
    assert subset is not None and subset.name == "DestinationRuleSubsetNotSelectPods" and subset.level == Level.ERROR
    assert len(CHECKS) >= 20


_scalars = st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["host", "hosts", "http", "route", "destination", "subset", "match", "uri", "prefix", "gateways",
                     "selector", "matchLabels", "subsets", "labels", "name", "tls", "mode", "servers", "port",
                     "number", "protocol", "egress", "rules", "from", "source", "principals", "x"]),
    inner, max_size=4), max_leaves=12)
_kinds = st.sampled_from(["VirtualService", "DestinationRule", "Gateway", "Sidecar", "ServiceEntry", "WorkloadEntry",
                          "AuthorizationPolicy", "PeerAuthentication", "Service", "Pod", "Secret", "Bogus"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_kinds, st.sampled_from(["default", "shop"]), st.sampled_from(["a", "b"]), _values),
                max_size=5))
def test_arbitrary_documents_never_crash_a_check(docs: list[tuple[str, str, str, object]]) -> None:
    group = {"Service": "v1", "Pod": "v1", "Secret": "v1", "AuthorizationPolicy": "security.istio.io/v1",
             "PeerAuthentication": "security.istio.io/v1"}
    collected = [({"apiVersion": group.get(kind, "networking.istio.io/v1"), "kind": kind,
                   "metadata": {"name": name, "namespace": ns}, "spec": spec}, f"d{i}")
                 for i, (kind, ns, name, spec) in enumerate(docs)]
    found = analyze(from_documents(collected))
    assert all(m.type.code != "IST0001" for m in found), [m.text for m in found if m.type.code == "IST0001"]


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_is_reported_not_raised(text: str) -> None:
    collector = Collector()
    add_text(collector, text, "t.yaml")
    analyze(collector.result())


def test_analyze_numbers_and_rejects_documents_as_pilot_does() -> None:
    """One splitter serves both: an invalid part and an over-size part are each one document, at
    the same index in pilot's file source errors and in analyze's MSH0001 messages."""
    from pilot.config.yaml_text import MAX_DOCUMENT_BYTES, load_text

    good = ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s, namespace: default}\n"
            "spec: {hosts: [s.example], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS}\n")
    large = "kind: ServiceEntry\nmetadata: {name: big}\nspec: {hosts: [" + "a" * MAX_DOCUMENT_BYTES + "]}\n"
    text = "\n---\n".join([good, "a: [unclosed", large, good.replace("name: s,", "name: t,")])
    pilot = load_text(text, "m.yaml")
    assert sorted((e.index, e.message.split(":")[0]) for e in pilot.errors) == [
        (1, "invalid YAML"), (2, "ServiceEntry default/big")]
    assert sorted(o.metadata.name for o in pilot.objects) == ["s", "t"]
    collector = Collector()
    add_text(collector, text, "m.yaml")
    problems = sorted((m.origin, m.type.code) for m in collector.problems)
    assert problems == [("m.yaml[1]", "MSH0001"), ("m.yaml[2]", "MSH0001")]
