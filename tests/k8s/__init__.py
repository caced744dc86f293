"""A real Kubernetes control plane for tests (see cluster.py and build-tools.sh)."""
