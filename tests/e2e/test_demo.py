"""`meshctl demo`, the README's main command, run as a user runs it: a real process with real
sidecars, the canary shift, and mutual TLS STRICT between the sidecars."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshctl.demo import caller_uri

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(120)
def test_the_demo_shifts_the_canary_with_no_failed_request_over_strict_mutual_tls() -> None:
    env = {**os.environ, "COLUMNS": "160"}
    # Port 0: pilot binds whatever is free itself. A port picked here and bound by the demo a second
    # later could be taken in between by another test worker (seen once in CI, the debug port).
    proc = subprocess.run(
        [sys.executable, "-m", "meshctl.cli", "demo", "--duration", "8", "--ads-port", "0",
         "--debug-port", "0", "--xds-tls-port", "0"],
        capture_output=True, text=True, timeout=110, env=env, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    done = [line for line in out.splitlines() if line.startswith("done:")]
    assert done and done[-1].endswith(" 0 failed"), out[-3000:]
    # Every answer reached reviews over mutual TLS, from the frontend's own identity.
    final = [line for line in out.splitlines() if line.startswith("mutual TLS STRICT:")][-1]
    assert "spiffe://cluster.local/ns/default/sa/frontend" in final and "no client certificate" not in final, final


def test_the_caller_is_the_last_element_of_the_forwarded_client_cert() -> None:
    mine = 'By=spiffe://cluster.local/ns/default/sa/reviews;Hash=ab;Subject="";URI=spiffe://cluster.local/ns/default/sa/frontend'
    earlier = 'By=spiffe://td/ns/a/sa/b;Hash=cd;Subject="CN=x, O=y";URI=spiffe://td/ns/a/sa/gateway'
    assert caller_uri(mine) == "spiffe://cluster.local/ns/default/sa/frontend"
    assert caller_uri(f"{earlier},{mine}") == "spiffe://cluster.local/ns/default/sa/frontend"
    assert caller_uri("") == ""
