"""The pure parts of status writing (pilot.kube.status) and lease timing (pilot.kube.leader)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pilot.kube.leader import LeaseTiming, holder_identity, micro_time
from pilot.kube.status import ACCEPTED, reports, same_status, status_body, warnings_by_object

NOW = datetime(2026, 12, 2, 7, 0, tzinfo=UTC)
VS = ("VirtualService", "shop", "reviews")


def test_warnings_are_grouped_by_the_object_they_name() -> None:
    found = warnings_by_object([
        "VirtualService shop/reviews: gateway shop/web does not exist",
        "VirtualService shop/reviews: http[0].delegate shop/d: not exported to namespace shop; route left out",
        "port 9080: TCP a and b share it",  # names no object
    ])
    assert sorted(found) == [VS]
    assert found[VS][0] == "gateway shop/web does not exist"


def test_reports_accept_a_clean_object_and_explain_problems() -> None:
    got = reports([(VS, None), (("Gateway", "shop", "web"), None), (("VirtualService", "shop", "bad"), "boom")],
                  ["VirtualService shop/reviews: gateway shop/web does not exist"],
                  serving_previous=[("VirtualService", "shop", "bad")])
    assert got[("Gateway", "shop", "web")] == ACCEPTED
    assert (got[VS].reconciled, got[VS].reason, got[VS].codes) == (
        False, "ReferencedResourceNotFound", (("IST0101", "ReferencedResourceNotFound"),))
    bad = got[("VirtualService", "shop", "bad")]
    assert (bad.reconciled, bad.reason, bad.codes[0][0]) == (False, "Invalid", "IST0106")
    assert bad.message == "boom (serving the previous version)"


def test_an_unclassified_warning_has_no_analysis_code() -> None:
    got = reports([(VS, None)], ["VirtualService shop/reviews: merged into DestinationRule shop/x for host h"])
    assert (got[VS].reconciled, got[VS].reason, got[VS].codes) == (False, "MeshWarning", ())


def test_status_body_keeps_the_transition_time_while_the_condition_holds() -> None:
    first = status_body(ACCEPTED, 3, NOW)
    assert first["conditions"][0] == {"type": "Reconciled", "status": "True", "reason": "Accepted",
                                      "message": ACCEPTED.message, "lastTransitionTime": "2026-12-02T07:00:00Z"}
    assert (first["observedGeneration"], first["validationMessages"]) == (3, None)
    later = status_body(ACCEPTED, 3, NOW.replace(hour=9), first)
    assert later == first and same_status(first, later)
    broken = reports([(VS, None)], ["VirtualService shop/reviews: gateway shop/web does not exist"])[VS]
    flipped = status_body(broken, 4, NOW.replace(hour=9), first)
    assert flipped["conditions"][0]["lastTransitionTime"] == "2026-12-02T09:00:00Z"
    assert flipped["validationMessages"] == [{
        "type": {"code": "IST0101", "name": "ReferencedResourceNotFound"}, "level": "ERROR",
        "documentationUrl": "https://istio.io/latest/docs/reference/config/analysis/ist0101/"}]
    assert not same_status(first, flipped)


def test_same_status_ignores_times_and_an_absent_message_list() -> None:
    body = status_body(ACCEPTED, 1, NOW)
    written = {**body, "conditions": [{**body["conditions"][0], "lastTransitionTime": "x"}]}
    del written["validationMessages"]
    assert same_status(written, body)
    assert not same_status(None, body)


def test_lease_timing_follows_client_go_rules_and_istio_defaults() -> None:
    assert LeaseTiming() == LeaseTiming(30.0, 15.0, 7.5)
    with pytest.raises(ValueError, match="renew_deadline"):
        LeaseTiming(10, 10, 1)
    with pytest.raises(ValueError, match="retry_period"):
        LeaseTiming(30, 6, 5)


def test_holder_identity_is_the_pod_name_or_a_unique_host_name() -> None:
    assert holder_identity("istiod-7f4b-abc12", "host") == "istiod-7f4b-abc12"
    assert holder_identity("", "host", "0a1b") == "host-0a1b"
    assert holder_identity("", "host") != holder_identity("", "host")
    assert micro_time(NOW) == "2026-12-02T07:00:00.000000Z"
