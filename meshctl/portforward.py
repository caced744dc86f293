"""A Kubernetes pod's Envoy admin (port 15000, pod loopback only), reached through `kubectl port-forward`.

`kubectl` asks the API server, which streams to the pod's kubelet; the forward lives as long as
the `async with` block and its process is stopped (then killed) when the block ends, also on
errors. One child process per command; nothing else runs on the event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from meshctl.output import UnreachableError

ADMIN_PORT = 15000
_FORWARDING = re.compile(rb"Forwarding from 127\.0\.0\.1:(\d+) -> ")


def pod_of(node_id: str, namespace: str) -> str:
    """The pod name in a node id `sidecar~<ip>~<pod>.<namespace>~<domain>`; ValueError if it has none."""
    parts = node_id.split("~")
    suffix = f".{namespace}"
    if len(parts) != 4 or not parts[2].endswith(suffix) or len(parts[2]) == len(suffix):
        raise ValueError(f"node id {node_id!r} names no pod of namespace {namespace!r}")
    return parts[2][: -len(suffix)]


def kubectl_args(namespace: str, pod: str, kubeconfig: Path | None, context: str | None) -> list[str]:
    """`kubectl port-forward` of the pod's admin to a free port on 127.0.0.1."""
    args = ["port-forward", "--namespace", namespace, f"pod/{pod}", f":{ADMIN_PORT}", "--address", "127.0.0.1"]
    if kubeconfig is not None:
        args += ["--kubeconfig", str(kubeconfig)]
    if context is not None:
        args += ["--context", context]
    return args


@contextlib.asynccontextmanager
async def port_forward(namespace: str, pod: str, kubeconfig: Path | None = None, context: str | None = None,
                       timeout: float = 20.0) -> AsyncIterator[str]:
    """`host:port` on 127.0.0.1 that reaches the pod's Envoy admin while the block runs.

    UnreachableError (naming the pod and kubectl's message) when kubectl is missing, fails, or
    does not report a forward within `timeout` seconds.
    """
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise UnreachableError(f"pod {namespace}/{pod}: kubectl is not on PATH; forward port {ADMIN_PORT} yourself "
                               "and pass --admin")
    proc = await asyncio.create_subprocess_exec(
        kubectl, *kubectl_args(namespace, pod, kubeconfig, context),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        port = await _forwarded_port(proc, timeout)
        if port is None:
            err = (await _rest(proc)).strip() or f"no forward within {timeout:g}s"
            raise UnreachableError(f"kubectl port-forward to pod {namespace}/{pod}:{ADMIN_PORT}: {err}")
        yield f"127.0.0.1:{port}"
    finally:
        await _stop(proc)


async def _forwarded_port(proc: asyncio.subprocess.Process, timeout: float) -> int | None:
    if proc.stdout is None:
        return None
    try:
        async with asyncio.timeout(timeout):
            while line := await proc.stdout.readline():
                if found := _FORWARDING.search(line):
                    return int(found.group(1))
    except TimeoutError:
        return None
    return None


async def _rest(proc: asyncio.subprocess.Process) -> str:
    """kubectl's error output once it has exited (or after a second, if it has not)."""
    if proc.stderr is None:
        return ""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            return (await proc.stderr.read()).decode(errors="replace")[-1000:]
    return ""


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
