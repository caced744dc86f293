"""The DestinationRule policy examples parse without warnings and translate consistently."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilot.config import load_file
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.xds import typeurls
from pilot.xds.snapshot import Snapshot

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.mark.parametrize("example", ["load-balancing", "circuit-breaking", "outlier-detection"])
def test_policy_examples_load_cleanly_and_translate_consistently(example: str) -> None:
    loaded = load_file(EXAMPLES / example / "mesh.yaml")
    assert loaded.errors == () and all(not o.warnings for o in loaded.objects)
    mesh = build_mesh(loaded.objects)
    assert mesh.warnings == ()
    frontend = mesh.workload("default", "frontend")
    assert frontend is not None
    proxy = ProxyClass(ProxyKind.SIDECAR, "default", bind_address=frontend.address, workload=frontend.name)
    resources = generate(mesh, proxy)
    assert Snapshot.from_resources(resources).consistency_errors() == []
    cluster = resources[typeurls.CLUSTER]["outbound|9080||reviews.default.svc.cluster.local"]
    policy = mesh.destination_rules["reviews.default.svc.cluster.local"].policy
    assert policy != type(policy)()  # the example's point is a non-empty policy
    assert cluster.HasField("circuit_breakers")
    assert (example == "outlier-detection") == cluster.HasField("outlier_detection")
