"""`meshctl describe` against a live local mesh (pilot's `/debug/configz`, real Envoy sidecars), and
every command line of the README's "Why is my route not applied?" run as written.

What describe says is checked against what the sidecars do: when it says a workload "receives no
traffic" from the VirtualService, real requests through the client's sidecar never reach it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from meshctl.localmesh import http_session
from tests.e2e.conftest import Canary

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
MESHCTL = [sys.executable, "-m", "meshctl.cli"]
README = Path(__file__).resolve().parents[2] / "README.md"
DEFAULT_DEBUG = "127.0.0.1:15014"
HOST = {"Host": "reviews:9080"}


async def meshctl(*args: str, cwd: Path | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*MESHCTL, *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def debug(canary: Canary) -> str:
    return str(canary.mesh.pilot.debug_address)


async def versions_answering(canary: Canary, requests: int = 40) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    async with http_session() as session:
        for _ in range(requests):
            async with session.get(canary.outbound + "/", headers=HOST) as resp:
                assert resp.status == 200
                counts[(await resp.json())["version"]] += 1
    return counts


async def test_describe_says_which_version_gets_no_traffic_and_envoy_agrees(canary: Canary) -> None:
    before = canary.mesh.pilot.store.revision
    canary.set_weights(100, 0)
    await canary.mesh.wait_applied(before)
    code, v2 = await meshctl("describe", "workload", "default/reviews-v2", "--debug", debug(canary))
    assert code == 0, v2
    assert "receives no traffic from VirtualService default/reviews" in v2
    assert "reviews.default.svc.cluster.local subset v2: 0%" in v2 and "[does not reach this workload]" in v2
    code, v1 = await meshctl("describe", "workload", "default/reviews-v1", "--debug", debug(canary), "-o", "json")
    assert code == 0, v1
    (route,) = json.loads(v1)["services"][0]["virtual_services"][0]["routes"]
    assert route["reaches_target"] is True and json.loads(v1)["warnings"] == []
    assert set(await versions_answering(canary)) == {"v1"}  # what the sidecars do matches the words


async def test_describe_service_lists_live_endpoints_by_subset(canary: Canary) -> None:
    code, out = await meshctl("describe", "service", "reviews", "-n", "default", "--debug", debug(canary))
    assert code == 0, out
    for version in canary.demo.versions:
        address = canary.demo.address(version)
        assert f"WorkloadEntry default/reviews-{version} at {address}: subsets {version} " \
               "(DestinationRule default/reviews)" in out
    assert "subset v1: 80%" in out and "subset v2: 20%" in out
    code, missing = await meshctl("describe", "workload", "default/nope", "--debug", debug(canary))
    assert code == 1 and "workload default/nope not found" in missing


def readme_commands() -> list[str]:
    """The command lines of the README's "Why is my route not applied?" (code blocks, comments cut)."""
    text = README.read_text()
    section = text[text.index('### "Why is my route not applied?"'):text.index("### `meshctl describe`")]
    lines = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        lines += [line.strip() for line in block.splitlines() if line.strip()]
    return lines


def test_readme_section_names_every_tool() -> None:
    commands = " ".join(readme_commands())
    for tool in ("meshctl analyze", "meshctl describe workload", "meshctl describe service", "meshctl wait",
                 "meshctl proxy-status", "meshctl proxy-config routes", "meshctl proxy-config clusters",
                 "meshctl proxy-config endpoints", "meshctl x simulate", "/debug/configz"):
        assert tool in commands, tool


async def test_readme_troubleshooting_commands_run_as_written(
    canary: Canary, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("work")  # outside pilot's config dir (read recursively): no duplicate objects
    (work / "reviews-vs.yaml").write_text((canary.config_dir / "route.yaml").read_text())
    addr = debug(canary)
    failures = []
    for line in readme_commands():
        live = line.replace(DEFAULT_DEBUG, addr)
        if live.startswith("meshctl "):
            code, out = await meshctl(*shlex.split(live)[1:], cwd=work)
        else:  # the curl | jq line, through a shell as a user types it
            proc = await asyncio.create_subprocess_exec(
                "bash", "-o", "pipefail", "-c", live, cwd=work, env=dict(os.environ),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            raw, _ = await asyncio.wait_for(proc.communicate(), 30)
            code, out = proc.returncode or 0, raw.decode()
            if code == 0:
                assert json.loads(out) in ([], None), out  # the canary mesh has no rejected object
        if code != 0:
            failures.append(f"{line}\n-> exit {code}\n{out}")
    assert not failures, "\n\n".join(failures)
