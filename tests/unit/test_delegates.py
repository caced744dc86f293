"""VirtualService delegation: Istio's merge of root and delegate routes, and what is left out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from pilot.api import ApiObject, InvalidObjectError, parse_object
from pilot.model import mesh as m
from pilot.model.build import build_mesh

SE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "ServiceEntry",
    "metadata": {"name": "shop", "namespace": "front"},
    "spec": {"hosts": ["shop.example.com"], "ports": [{"number": 80, "name": "http"}], "resolution": "DNS"},
}


def vs(name: str, http: list[dict[str, Any]], namespace: str = "front", **spec: Any) -> ApiObject:
    return parse_object({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                         "metadata": {"name": name, "namespace": namespace}, "spec": {"http": http, **spec}})


def to(host: str) -> list[dict[str, Any]]:
    return [{"destination": {"host": host}}]


def merged(*objects: ApiObject) -> tuple[tuple[m.HttpRoute, ...], tuple[str, ...]]:
    """The root's routes after delegation, and the warnings about delegation."""
    mesh = build_mesh([parse_object(SE), *objects])
    return mesh.virtual_services["shop.example.com"].http, tuple(w for w in mesh.warnings if ".delegate " in w)


ROOT = vs("shop", [
    {"name": "cart", "match": [{"uri": {"prefix": "/cart"}}], "delegate": {"name": "cart", "namespace": "team"},
     "timeout": "3s"},
    {"name": "rest", "route": to("shop.example.com")},
], hosts=["shop.example.com"])


def test_delegate_routes_take_the_root_routes_place_with_narrowed_matches() -> None:
    cart = vs("cart", [
        {"name": "v2", "match": [{"uri": {"prefix": "/cart/v2"}, "headers": {"x-beta": {"exact": "1"}}}],
         "route": to("cart-v2.example.com")},
        {"name": "any", "route": to("cart.example.com"), "timeout": "1s"},
    ], namespace="team")
    routes, warnings = merged(ROOT, cart)
    assert [r.name for r in routes] == ["cart-v2", "cart-any", "rest"]
    v2, anything, rest = routes
    (match,) = v2.matches
    assert match.uri == m.StringMatch("prefix", "/cart/v2")
    assert match.headers == (("x-beta", m.StringMatch("exact", "1")),)
    assert v2.timeout == timedelta(seconds=3)  # the delegate route sets none: the root's
    (match,) = anything.matches  # no matches of its own: the root's
    assert match.uri == m.StringMatch("prefix", "/cart")
    assert anything.timeout == timedelta(seconds=1)  # its own wins
    assert rest.name == "rest"
    assert warnings == ()


def test_a_delegate_route_matching_outside_the_root_is_left_out_and_reported() -> None:
    cart = vs("cart", [
        {"match": [{"uri": {"prefix": "/checkout"}}], "route": to("pay.example.com")},
        {"match": [{"uri": {"regex": "/cart/.*"}}], "route": to("pay.example.com")},  # regex never narrows
        {"match": [{"uri": {"exact": "/cart/items"}}], "route": to("cart.example.com")},
    ], namespace="team")
    routes, warnings = merged(ROOT, cart)
    assert [r.matches[0].uri for r in routes[:-1]] == [m.StringMatch("exact", "/cart/items")]
    assert warnings == (
        "VirtualService front/shop: http[0].delegate team/cart: its http[0] has a match outside the root "
        "route's matches; left out",
        "VirtualService front/shop: http[0].delegate team/cart: its http[1] has a match outside the root "
        "route's matches; left out",
    )


def test_a_delegate_not_exported_to_the_roots_namespace_costs_only_that_route() -> None:
    cart = vs("cart", [{"route": to("cart.example.com")}], namespace="team", exportTo=["."])
    routes, warnings = merged(ROOT, cart)
    assert [r.name for r in routes] == ["rest"]
    assert warnings == ("VirtualService front/shop: http[0].delegate team/cart: not exported to namespace front; "
                        "route left out",)


def test_a_delegate_alone_routes_nothing() -> None:
    cart = vs("cart", [{"route": to("cart.example.com")}], namespace="team")
    mesh = build_mesh([parse_object(SE), cart])
    assert mesh.virtual_services == {}


def test_each_delegate_match_pairs_with_every_root_match_it_narrows() -> None:
    root = vs("shop", [{"match": [{"uri": {"prefix": "/a"}, "name": "a"}, {"uri": {"prefix": "/b"}, "name": "b"},
                                  {"headers": {"x-team": {"exact": "red"}}, "name": "red"}],
                        "delegate": {"name": "d"}}], hosts=["shop.example.com"])
    child = vs("d", [{"match": [{"uri": {"prefix": "/a/1"}, "name": "one"}], "route": to("one.example.com")}])
    routes, _ = merged(root, child)
    (route,) = routes
    names = [x.name for x in route.matches]
    assert names == ["a-one", "red-one"]  # /b is not narrowed by /a/1; the header-only root match is
    assert route.matches[1].headers == (("x-team", m.StringMatch("exact", "red")),)


@pytest.mark.parametrize(("spec", "path", "reason"), [
    ({"gateways": ["gw"], "http": [{"route": to("a")}]}, "spec.gateways", "must not set it"),
    ({"http": [{"delegate": {"name": "x"}}]}, "spec.http[0].delegate", "only one level of delegation"),
    ({}, "spec.hosts", "at least one host is required"),
    ({"hosts": ["a"], "http": [{"delegate": {"name": "x"}, "route": to("a")}]}, "spec.http[0]",
     "must set exactly one of route, redirect, directResponse, delegate"),
])
def test_delegate_rules_are_validated(spec: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(InvalidObjectError) as info:
        parse_object({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                      "metadata": {"name": "d", "namespace": "front"}, "spec": spec})
    assert any(i.path == path and reason in i.message for i in info.value.issues), info.value.issues
