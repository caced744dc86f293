"""The Go simulated Envoys (`benchmarks/simenvoy`): built once into a cache, driven like a worker.

`GoWorkerHandle` answers the same commands as `worker.WorkerHandle` (connect, status, arm,
results, recorded, recorded_changes, disconnect, close), so the runner drives either kind of client the same way.
One process holds the whole fleet: Go's scheduler spreads the streams over the cores, where the
Python clients need one worker process per core.

Why it exists: grpcio's read path costs a Python client about 0.6 ms of CPU per 0.57 MB route
configuration, 1.2-1.6 s per mission-scale route change on the two cores pilot shares, more than
pilot itself spends (session 28's floor). Envoy reads xDS in C++; compiled Go is much closer to
that cost, so with these clients the figures say more about the control plane.

They identify as Envoy 1.40 (`Node.user_agent_build_version`, `as_envoy`) and, on delta
streams, take virtual hosts over VHDS as it does: pilot serves them route configurations naming
VHDS and a route change as the virtual hosts it changed (`pilot.translate.vhds`). The Python
clients identify as nothing and get route configurations whole.

The binary is built with the machine's Go from the module next to this file (versions pinned by
its go.mod and go.sum, downloaded from the Go module proxy) into
`${XDG_CACHE_HOME:-~/.cache}/meshctl/simenvoy/<hash of the module's files>/`, so a changed
source builds anew and an unchanged one is reused; a cold build takes about a minute.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.client import ClientResult, Expectation
from benchmarks.procs import ProcessGroup
from benchmarks.worker import NodeSpec, Worker

SOURCE = Path(__file__).resolve().parent / "simenvoy"


def cache_root(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshctl" / "simenvoy"


def source_digest() -> str:
    """Hash of the module's files: the cache key, so an edit is never served a stale binary."""
    digest = hashlib.sha256()
    sources = sorted(p for p in SOURCE.glob("*.go") if not p.stem.endswith("_test"))
    built = [SOURCE / "go.mod", SOURCE / "go.sum", *sources]
    for path in built:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def binary(env: Mapping[str, str] | None = None) -> Path:
    """The built simulated Envoys, building them first if this source was never built here.

    Raises `RuntimeError` with Go's output when Go is missing or the build fails.
    """
    env = dict(os.environ if env is None else env)
    target = cache_root(env) / source_digest() / "simenvoy"
    if target.exists():
        return target
    go = shutil.which("go", path=env.get("PATH"))
    if go is None:
        raise RuntimeError("the Go simulated Envoys need Go on PATH (https://go.dev/dl/)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"simenvoy.{os.getpid()}.partial")
    build_env = {**env, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly -buildvcs=false"}
    done = subprocess.run([go, "build", "-trimpath", "-o", str(partial), "."], cwd=SOURCE, env=build_env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE} failed:\n{done.stdout}{done.stderr}")
    partial.replace(target)  # atomic: a concurrent build just replaces it with the same binary
    return target


class GoWorkerHandle:
    """The coordinator's side of the Go simulated Envoys: the commands of `worker.WorkerHandle`.

    Replies are read by a helper thread into a queue, so `call` can time out and notice a dead
    process; stderr goes to `log` (Go panics land there).
    """

    def __init__(self, process: subprocess.Popen[bytes], node: Callable[[NodeSpec], Any] = Worker.node) -> None:
        self.process = process
        self.node = node  # the Node each client sends (`Worker.node`: a plain sidecar; `kube_worker`: a Pod's)
        self._replies: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"simenvoy-{process.pid}").start()

    @classmethod
    def start(cls, group: ProcessGroup, log: Path, node: Callable[[NodeSpec], Any] = Worker.node) -> GoWorkerHandle:
        """Start the binary under `group`, which stops it at the end; its clients send `node(spec)`."""
        with log.open("ab") as err:
            proc = subprocess.Popen([str(binary())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        group.adopt(proc)
        return cls(proc, node)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._replies.put(line)

    def call(self, name: str, *args: Any, timeout: float = 30.0) -> Any:
        message = _command(name, args, self.node)
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(message).encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise RuntimeError(f"simulated Envoys {self.process.pid} are gone "
                               f"(exit code {self.process.poll()})") from exc
        deadline = time.monotonic() + timeout
        line = None
        while line is None:
            with contextlib.suppress(queue.Empty):
                line = self._replies.get(timeout=0.05)
            if line is None and self.process.poll() is not None and self._replies.empty():
                raise RuntimeError(f"simulated Envoys {self.process.pid} died (exit code {self.process.returncode})")
            if line is None and time.monotonic() > deadline:
                raise TimeoutError(f"simulated Envoys {self.process.pid}: no reply to {name!r} in {timeout}s")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"simulated Envoys {self.process.pid} failed on {name!r}: {reply['error']}")
        if name == "close":
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        return _reply(name, reply["ok"])


ENVOY_RELEASE = (1, 40)  # what the simulated Envoys say they are (the release whose VHDS they follow)


def as_envoy(node: Any) -> Any:
    """`node` as Envoy sends it: its user agent and release (pilot reads them to serve VHDS)."""
    node.user_agent_name = "envoy"
    node.user_agent_build_version.version.major_number, node.user_agent_build_version.version.minor_number = (
        ENVOY_RELEASE)
    return node


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _command(name: str, args: tuple[Any, ...], node: Callable[[NodeSpec], Any]) -> dict[str, Any]:
    if name == "connect":
        target, delta, specs, record, per_connection = args
        nodes = [_b64(as_envoy(node(spec)).SerializeToString()) for spec in specs]
        return {"cmd": name, "target": target, "delta": delta, "nodes": nodes, "record": record,
                "streams_per_connection": per_connection}
    if name == "arm":
        (exp,) = args
        assert isinstance(exp, Expectation)
        return {"cmd": name, "expectation": {"kind": exp.kind, "type_url": exp.type_url,
                                             "needles": [_b64(n) for n in exp.needles]}}
    if args:
        raise ValueError(f"{name!r} takes no arguments for the Go simulated Envoys, got {args!r}")
    return {"cmd": name}


def _reply(name: str, value: Any) -> Any:
    if name == "results":
        return [ClientResult(ready_at=r["ready_at"], matched_at=r["matched_at"], responses=r["responses"],
                             reconnects=r["reconnects"], error=r["error"]) for r in value]
    if name == "recorded":
        initial = [(type_url, base64.b64decode(raw)) for type_url, raw in value["initial"]]
        return initial, _changes(value["changes"])
    if name == "recorded_changes":
        return _changes(value)
    return value


def _changes(value: dict[str, str]) -> dict[str, bytes]:
    return {kind: base64.b64decode(raw) for kind, raw in value.items()}
