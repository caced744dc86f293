"""Was a change applied? The store's arrival revisions, the pusher's class changes and each stream's
ACKs combined by `pilot.distribution`, and how `meshctl wait` reads the answer (`judge`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meshctl.wait_cmd import Wanted, judge, parse_duration, wanted_from_files
from pilot.api import parse_object
from pilot.config.documents import DocumentError
from pilot.config.store import ConfigStore
from pilot.config.yaml_dir import load_dir
from pilot.config.yaml_text import load_text
from pilot.debug import distribution_report
from pilot.distribution import content_hash
from pilot.metrics import PushMetrics
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyIdentity, ProxyKind
from pilot.push import Pusher
from pilot.translate import generate
from pilot.xds.cache import SnapshotCache
from pilot.xds.status import StatusRegistry, StreamStatus, XdsMetrics

CANARY = Path(__file__).resolve().parents[2] / "examples" / "canary"
REVIEWS = ProxyClass(ProxyKind.SIDECAR, "default", (("app", "reviews"), ("version", "v1")))
FRONTEND = ProxyClass(ProxyKind.SIDECAR, "default", (("app", "frontend"),))
POLICY_KEY = ("AuthorizationPolicy", "default", "reviews-deny")
POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-deny, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
"""


def vs(weights: tuple[int, int], **meta: Any) -> Any:
    return parse_object({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "default", **meta},
        "spec": {"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": weights[0]},
            {"destination": {"host": "reviews", "subset": "v2"}, "weight": weights[1]}]}]}})


def test_content_hash_ignores_bookkeeping_and_follows_the_spec() -> None:
    plain = vs((80, 20))
    assert content_hash(plain) == content_hash(vs((80, 20), resourceVersion="42", generation=3, uid="u"))
    assert content_hash(plain) != content_hash(vs((20, 80)))
    assert content_hash(plain) != content_hash(vs((80, 20), labels={"team": "a"}))


def test_store_records_when_content_arrived_and_why_it_was_rejected() -> None:
    store = ConfigStore()
    store.apply(vs((80, 20)))
    key = ("VirtualService", "default", "reviews")
    first = store.arrival(key)
    assert first is not None and first[0] == store.revision
    store.apply(vs((80, 20)))  # the same content again: not a new arrival
    assert store.arrival(key) == first
    store.apply(vs((50, 50)))
    second = store.arrival(key)
    assert second is not None and second[0] == store.revision > first[0]
    store.delete(*key)
    assert store.arrival(key) is None
    err = DocumentError("rules.yaml", 0, *key, "spec.http[0].route[0].weight: must be between 0 and 100")
    store.replace_source("f", [vs((80, 20))])
    store.replace_source("f", [], [err])
    assert store.rejection(key) == (str(err), True)  # the previous version still serves
    assert store.rejection(("VirtualService", "default", "other")) is None


def test_a_status_write_is_not_a_new_arrival() -> None:
    """On Kubernetes pilot's own status write gives the object a new resourceVersion and status;
    the store takes the new object (it is what the API server holds) but the content's arrival
    stays, so `meshctl wait` keeps judging proxies against the change they must take."""
    store = ConfigStore()
    store.apply(vs((80, 20), resourceVersion="1", generation=1))
    key = ("VirtualService", "default", "reviews")
    first = store.arrival(key)
    revision = store.revision
    written = vs((80, 20), resourceVersion="2", generation=1).model_copy(
        update={"status": {"observedGeneration": 1, "conditions": [{"type": "Reconciled", "status": "True"}]}})
    store.apply(written)
    assert store.revision > revision and store.get(*key) == written  # the store holds the new object
    assert store.arrival(key) == first
    store.apply(vs((80, 20), resourceVersion="3", generation=2, labels={"team": "a"}))  # labels are content
    assert store.arrival(key) is not None and store.arrival(key) != first
    assert vs((80, 20)).same_content(vs((80, 20), resourceVersion="9", uid="u"))
    assert not vs((80, 20)).same_content(vs((20, 80)))


class Mesh:
    """A real store, pusher and snapshot cache with streams driven as sessions drive them."""

    def __init__(self) -> None:
        self.store, self.cache = ConfigStore(), SnapshotCache()
        self.status = StatusRegistry(XdsMetrics(CollectorRegistry()))
        self.pusher = Pusher(self.store, self.cache, build_mesh, generate, PushMetrics(CollectorRegistry()))
        self.store.replace_source("files", load_dir(CANARY).objects)
        self.watches = [self.cache.watch(REVIEWS), self.cache.watch(FRONTEND)]
        for watch in self.watches:
            watch.__enter__()
        self.pusher.rebuild()
        self.reviews = self.connect("sidecar~1~reviews-v1.default~x", REVIEWS)
        self.frontend = self.connect("sidecar~2~frontend.default~x", FRONTEND)

    def connect(self, node_id: str, key: ProxyClass) -> StreamStatus:
        stream = self.status.open(ProxyIdentity(node_id, "c", key, workload=node_id.split("~")[2]), "sotw", "t")
        self.send(stream)
        self.ack(stream)
        return stream

    def send(self, stream: StreamStatus) -> None:
        """What a session does when it takes in its class's snapshot: set current, send each type."""
        snapshot = self.cache.get(stream.identity.proxy_class)
        assert snapshot is not None
        for type_url, version in snapshot.versions().items():
            stream.of(type_url).current_version = version
            self.status.record_sent(stream, type_url, version, f"n-{version}")

    def ack(self, stream: StreamStatus, nack: str | None = None) -> None:
        for type_url, ts in stream.types.items():
            if nack and type_url.endswith("RouteConfiguration"):
                self.status.record_nack(stream, type_url, ts.sent_version, nack)
            else:
                self.status.record_ack(stream, type_url, ts.sent_version)

    def apply_policy(self) -> int:
        self.store.replace_source("rules", load_text(POLICY).objects)
        return self.store.revision

    def report(self) -> dict[str, Any]:
        return distribution_report(self.store, self.pusher, self.status, POLICY_KEY)

    def states(self) -> dict[str, tuple[str, str]]:
        return {p["workload"]: (p["state"], p["reason"]) for p in self.report()["proxies"]}


@pytest.fixture
def mesh() -> Any:
    made = Mesh()
    yield made
    for watch in made.watches:
        watch.__exit__(None, None, None)


def test_a_change_is_applied_once_every_affected_proxy_acked_it(mesh: Mesh) -> None:
    assert mesh.report()["status"] == "not found"
    revision = mesh.apply_policy()
    report = mesh.report()
    assert report["status"] == "found" and report["revision"] == revision
    assert report["content_hash"] == content_hash(load_text(POLICY).objects[0])
    # Not built yet: every connected proxy may be affected.
    assert {s for s, _ in mesh.states().values()} == {"PENDING"}
    assert "not built" in mesh.states()["reviews-v1.default"][1]
    mesh.pusher.rebuild()
    # The policy selects reviews only: frontend's config did not change, it is merely counted.
    assert mesh.states() == {"reviews-v1.default": ("PENDING", "the new config is not sent yet")}
    assert mesh.report()["unaffected"] == 1
    mesh.send(mesh.reviews)
    state, reason = mesh.states()["reviews-v1.default"]
    assert state == "PENDING" and "waiting for its ACK" in reason
    mesh.ack(mesh.reviews)
    assert mesh.states() == {"reviews-v1.default": ("ACKED", "")}
    assert mesh.report()["counts"]["ACKED"] == 1


def test_a_nack_is_reported_with_envoys_message(mesh: Mesh) -> None:
    mesh.apply_policy()
    mesh.pusher.rebuild()
    mesh.send(mesh.reviews)
    mesh.ack(mesh.reviews, nack="Invalid regex '(unclosed'")
    state, reason = mesh.states()["reviews-v1.default"]
    assert state == "NACKED" and reason == "RDS rejected: Invalid regex '(unclosed'"


def test_a_class_pilot_cannot_generate_for_is_a_failure(mesh: Mesh) -> None:
    def broken(mesh_: Any, proxy: ProxyClass) -> Any:
        raise RuntimeError("boom")

    mesh.apply_policy()
    mesh.pusher.generate = broken
    mesh.pusher.rebuild()
    states = mesh.states()
    assert states["reviews-v1.default"][0] == "NOT_GENERATED" and "boom" in states["reviews-v1.default"][1]


def test_a_proxy_that_left_before_acking_is_reported_until_it_returns(mesh: Mesh) -> None:
    mesh.apply_policy()
    mesh.pusher.rebuild()
    mesh.send(mesh.reviews)
    mesh.status.close(mesh.reviews)
    assert mesh.states()["reviews-v1.default"][0] == "DISCONNECTED"
    again = mesh.connect("sidecar~1~reviews-v1.default~x", REVIEWS)  # reconnects and takes it in
    assert mesh.states() == {"reviews-v1.default": ("ACKED", "")}
    mesh.status.close(again)  # left after ACKing: nothing to report
    assert mesh.states() == {}


def test_wait_judges_pilots_answer() -> None:
    want = Wanted("VirtualService", "default", "reviews", content_hash="abc")
    found = {"status": "found", "content_hash": "abc", "proxies": [
        {"proxy": "a", "state": "ACKED", "reason": ""}, {"proxy": "b", "state": "DISCONNECTED", "reason": "gone"}]}
    assert judge(want, found).state == "applied"
    assert judge(want, {**found, "content_hash": "old"}).state == "pending"
    assert judge(want, {**found, "content_hash": "old", "rejected": "f[0]: bad"}).state == "failed"
    assert judge(want, {"status": "not found"}).state == "pending"
    assert judge(want, {"status": "rejected", "rejected": "f[0]: bad"}).reason == "pilot rejected it: f[0]: bad"
    nacked = judge(want, {**found, "proxies": [{"proxy": "a", "state": "NACKED", "reason": "RDS rejected: x"}]})
    assert (nacked.state, nacked.reason) == ("failed", "a: RDS rejected: x")
    by_generation = Wanted("VirtualService", "default", "reviews", generation=3)
    assert judge(by_generation, {**found, "generation": 2}).state == "pending"
    assert judge(by_generation, {**found, "generation": 3}).state == "applied"


def test_wait_reads_files_and_durations(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    [(want, _)] = wanted_from_files([path])
    assert (want.kind, want.namespace, want.name) == POLICY_KEY
    assert want.content_hash == content_hash(load_text(POLICY).objects[0])
    assert [parse_duration(t) for t in ("30s", "2m", "500ms", "1.5")] == [30.0, 120.0, 0.5, 1.5]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_an_object_pilot_rejected_outright_is_reported_as_rejected(mesh: Mesh) -> None:
    err = DocumentError("rules.yaml", 0, *POLICY_KEY, "spec.action: must be one of ALLOW, DENY, AUDIT, CUSTOM")
    mesh.store.replace_source("rules", [], [err])
    report = mesh.report()
    assert (report["status"], report["rejected"]) == ("rejected", str(err))
    assert judge(Wanted(*POLICY_KEY, content_hash="x"), report).state == "failed"


# ---- --for=delete: the store remembers removals, and a removal is distributed like an arrival ----

def test_store_records_when_an_object_was_removed_until_it_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    store = ConfigStore()
    key = ("VirtualService", "default", "reviews")
    store.apply(vs((80, 20)))
    assert store.removal(key) is None  # present
    store.delete(*key)
    removed = store.removal(key)
    assert removed is not None and removed[0] == store.revision
    store.apply(vs((50, 50)))
    assert store.removal(key) is None  # back again
    monkeypatch.setattr("pilot.config.store.REMOVALS_KEPT", 2)
    names = ("a", "b", "c")
    for name in names:
        store.apply(vs((80, 20), name=name))
    for name in names:
        store.delete("VirtualService", "default", name)
    assert [store.removal(("VirtualService", "default", n)) is not None for n in names] == [False, True, True]


def test_a_removal_is_applied_once_every_proxy_it_affected_acked_it(mesh: Mesh) -> None:
    mesh.apply_policy()
    mesh.pusher.rebuild()
    mesh.send(mesh.reviews)
    mesh.ack(mesh.reviews)
    mesh.store.replace_source("rules", [])  # the policy file is gone
    report = mesh.report()
    assert report["status"] == "deleted" and report["revision"] == mesh.store.revision
    want = Wanted(*POLICY_KEY, deleted=True)
    assert judge(want, report).state == "pending"
    mesh.pusher.rebuild()
    assert mesh.states() == {"reviews-v1.default": ("PENDING", "the new config is not sent yet")}
    mesh.send(mesh.reviews)
    mesh.ack(mesh.reviews)
    assert mesh.states() == {"reviews-v1.default": ("ACKED", "")}
    assert judge(want, mesh.report()).state == "applied"


def test_wait_for_delete_judges_pilots_answer() -> None:
    want = Wanted("VirtualService", "default", "reviews", deleted=True)
    held = judge(want, {"status": "found", "revision": 7})
    assert (held.state, held.reason) == ("pending", "pilot still holds it (revision 7)")
    assert judge(want, {"status": "not found"}).state == "applied"  # no record: nothing to wait for
    deleted = {"status": "deleted", "revision": 9, "proxies": [{"proxy": "a", "state": "PENDING", "reason": "x"}]}
    assert judge(want, deleted).state == "pending"
    assert judge(want, {**deleted, "proxies": [{"proxy": "a", "state": "ACKED", "reason": ""}]}).state == "applied"
    nacked = judge(want, {**deleted, "proxies": [{"proxy": "a", "state": "NACKED", "reason": "RDS rejected: y"}]})
    assert (nacked.state, nacked.reason) == ("failed", "a: RDS rejected: y")
