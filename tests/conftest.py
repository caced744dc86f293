"""Shared pytest options. Keep this small: fixtures belong next to the tests that use them."""

from __future__ import annotations

import os

import pytest

# grpc-core logs every GOAWAY of a closed test stream at INFO; it reads this when grpc loads,
# which happens after this file in every test run. Errors still show.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# Tests run in parallel (pytest-xdist): a `meshctl up` on a cluster that names no webhook address
# takes a free port instead of the fixed 15017 another worker's pilot may hold.
os.environ.setdefault("MESHCTL_WEBHOOKS", "127.0.0.1:0")

# The session-scoped `kube_cluster` fixture (a real etcd + kube-apiserver + kube-controller-manager).
pytest_plugins = ["tests.k8s.cluster"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite golden files from current output instead of comparing",
    )


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))
