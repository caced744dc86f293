"""What the tests of proxies that stop reading share (send timeout, write budget, write wave): a
proxy posing as the benchmark mesh's first workload, and a metric of the pilot serving it."""

from __future__ import annotations

from typing import Any

from benchmarks import meshgen
from pilot.app import Pilot
from pilot.testing.ads_client import make_node


def node(name: str) -> Any:
    """A sidecar Node of workload svc-000 v1 in the benchmark mesh (`meshgen`), named `name`."""
    return make_node(f"sidecar~127.0.9.1~{name}.{meshgen.NAMESPACE}~bench.svc.cluster.local",
                     namespace=meshgen.NAMESPACE, labels={"app": "svc-000", "version": "v1"})


def metric(pilot: Pilot, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of pilot's registry; 0 when it has not been recorded yet."""
    return pilot.registry.get_sample_value(name, labels) or 0.0
