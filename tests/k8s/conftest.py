"""Fixtures of the Kubernetes tests: pod sandboxes on a test bridge and the tests' kubelet."""

from tests.k8s.pods import kubelet, pod_network

__all__ = ["kubelet", "pod_network"]
