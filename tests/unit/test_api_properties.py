"""Property tests: no document, however wrong, makes parsing or loading crash; errors only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilot.api import KINDS, ApiError, ApiObject, parse_object
from pilot.config import load_dir, load_text

FIELD_NAMES = [
    "hosts",
    "ports",
    "number",
    "name",
    "protocol",
    "targetPort",
    "resolution",
    "location",
    "endpoints",
    "address",
    "labels",
    "weight",
    "workloadSelector",
    "host",
    "subsets",
    "trafficPolicy",
    "http",
    "route",
    "destination",
    "subset",
    "match",
    "uri",
    "prefix",
    "exact",
    "timeout",
    "ingress",
    "defaultEndpoint",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["STATIC", "DNS", "HTTP", "10s", "127.0.0.1:80", "reviews", "*.x.com", "v1"]),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=30,
)
istio_like = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from(["networking.istio.io/v1", "networking.istio.io/v1alpha3", "v1", ""]),
        "kind": st.sampled_from([*KINDS, "Pod"]),
        "metadata": st.fixed_dictionaries(
            {"name": st.sampled_from(["a", "b-1", "", "Bad"])},
            optional={
                "namespace": st.sampled_from(["default", "x", "UPPER"]),
                "creationTimestamp": st.sampled_from(["2024-01-01T00:00:00Z", "yesterday"]),
            },
        ),
        "spec": st.dictionaries(st.sampled_from(FIELD_NAMES), json_like, max_size=6),
    }
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(json_like, istio_like))
def test_parse_object_raises_only_api_errors(document: Any) -> None:
    try:
        obj = parse_object(document)
    except ApiError as exc:
        assert str(exc)  # every error explains itself
    else:
        assert isinstance(obj, ApiObject)
        obj.to_dict()  # a parsed object can always be shown on the debug page


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(istio_like, json_like), max_size=4), st.text(max_size=40))
def test_load_text_never_crashes(documents: list[Any], garbage: str) -> None:
    text = "\n---\n".join(yaml.safe_dump(d) for d in documents) + "\n---\n" + garbage
    result = load_text(text, "random.yaml")
    assert len(result.objects) + len(result.errors) >= 0
    for err in result.errors:
        assert err.file == "random.yaml" and err.message


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_load_dir_survives_any_bytes(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "junk.yaml").write_bytes(data)
    load_dir(tmp_path)
