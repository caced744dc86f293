"""Every directory under ``examples/`` is ready to run, checked without starting anything.

Examples are discovered, not listed, so a new one is checked the day it lands: its YAML loads
without errors or unknown-field warnings, the mesh builds without warnings, and each workload the
README starts (`meshctl proxy run [--gateway] --workload ns/name`) gets config that passes the
snapshot consistency check, generated for the class that command would connect as. The README
waits for exactly those proxies before its first request and ends with the command that stops
everything (`tests/e2e/test_example_readmes.py` runs the commands for real).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from pilot.config import load_dir
from pilot.model.build import build_mesh
from pilot.model.mesh import MeshSnapshot
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.xds import typeurls
from pilot.xds.snapshot import Snapshot

ROOT = Path(__file__).parents[2]
EXAMPLES_DIR = ROOT / "examples"
EXAMPLES = sorted(p.name for p in EXAMPLES_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
# One `meshctl proxy run ...` command: up to the shell's `&`, `;` or the end of the line.
PROXY_RUN = re.compile(r"meshctl proxy run([^&;\n]*)")
WORKLOAD_FLAG = re.compile(r"--workload[ =](\S+)")


@dataclass(frozen=True)
class ProxyRun:
    """A `meshctl proxy run` command from an example's README."""

    namespace: str
    name: str
    gateway: bool


def readme(example: str) -> str:
    path = EXAMPLES_DIR / example / "README.md"
    assert path.is_file(), f"examples/{example} has no README.md"
    return path.read_text()


def proxy_runs(text: str) -> list[ProxyRun]:
    runs = []
    for command in PROXY_RUN.findall(text):
        flag = WORKLOAD_FLAG.search(command)
        assert flag, f"`meshctl proxy run{command}` names no --workload"
        namespace, _, name = flag.group(1).partition("/")
        runs.append(ProxyRun(namespace, name, "--gateway" in command.split()))
    return runs


@cache
def mesh_of(example: str) -> MeshSnapshot:
    """The example's mesh, after checking that its YAML loads cleanly (cached: several tests use it)."""
    loaded = load_dir(EXAMPLES_DIR / example)
    assert loaded.errors == (), [str(e) for e in loaded.errors]
    assert loaded.objects, f"examples/{example} has no mesh config"
    warned = {str(o.ref): [w.path for w in o.warnings] for o in loaded.objects if o.warnings}
    assert warned == {}, f"unknown or deprecated fields: {warned}"
    return build_mesh(loaded.objects)


def test_examples_are_discovered_and_all_listed_in_the_readme() -> None:
    """The top-level README names the example directories: exactly the ones that exist."""
    text = (ROOT / "README.md").read_text()
    start = text.index("Ready-to-run configs")
    paragraph = text[start : text.index("\n\n", start)]
    listed = sorted(n for n in re.findall(r"`([^`]+)`", paragraph) if re.fullmatch(r"[a-z0-9-]+", n))
    assert len(EXAMPLES) >= 10
    assert listed == EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES)
def test_readme_runs_the_example_and_every_workload_in_it(example: str) -> None:
    text = readme(example)
    assert f"meshctl up --config-dir examples/{example}" in text
    runs = proxy_runs(text)
    started = sorted((r.namespace, r.name) for r in runs)
    assert len(started) == len(set(started)), f"a workload is started twice: {started}"
    assert started == sorted(mesh_of(example).workloads), "README must start exactly the example's WorkloadEntries"


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_builds_without_warnings_and_every_proxy_gets_consistent_config(example: str) -> None:
    mesh = mesh_of(example)
    assert mesh.warnings == ()
    assert mesh.workloads, f"examples/{example} declares no WorkloadEntry"
    gateway_runs = {(r.namespace, r.name) for r in proxy_runs(readme(example)) if r.gateway}
    for key, wl in sorted(mesh.workloads.items()):
        # What a gateway Deployment would be: a Gateway selects it by (non-empty) selector.
        selected = any(g.selector and g.selects(wl.labels) for g in mesh.scoping.gateways)
        assert selected == (key in gateway_runs), f"{wl.name}: run with --gateway iff a Gateway selects it"
        kind = ProxyKind.ROUTER if selected else ProxyKind.SIDECAR
        labels = tuple(sorted(wl.labels.items()))
        proxy = ProxyClass(kind, wl.namespace, labels=labels, bind_address=wl.address, workload=wl.name)
        resources = generate(mesh, proxy)
        assert Snapshot.from_resources(resources).consistency_errors() == [], wl.name
        assert resources[typeurls.LISTENER], f"{wl.name} got no listeners"


@pytest.mark.parametrize("example", EXAMPLES)
def test_readme_waits_for_its_proxies_before_any_request_and_says_how_to_stop(example: str) -> None:
    """Pasted verbatim, background proxies need a readiness wait and a way to stop them all
    (the e2e test `test_example_readmes.py` runs the commands; this checks the shape, fast)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", readme(example), re.MULTILINE | re.DOTALL)
    lines = "".join(blocks).splitlines()
    waits = [i for i, line in enumerate(lines) if line.startswith("meshctl proxy wait ")]
    assert len(waits) == 1, "one `meshctl proxy wait` for all the workloads"
    waited = sorted(tuple(w.split("/", 1)) for w in lines[waits[0]].split("#")[0].split()[3:])
    assert waited == sorted((r.namespace, r.name) for r in proxy_runs(readme(example)))
    last_run = max(i for i, line in enumerate(lines) if "meshctl proxy run" in line)
    first_request = min((i for i, line in enumerate(lines) if re.search(r"\bcurl |socket\.", line)), default=None)
    assert last_run < waits[0] and (first_request is None or waits[0] < first_request)
    assert blocks[-1] == "kill $(jobs -p)\n", "the last block stops every background job"


# A five-digit number standing alone (not part of an address, a version or a longer word).
_PORTISH = re.compile(r"(?<![\w.:/-])(\d{5})(?![\w.])")


def test_example_ports_stay_out_of_the_range_tests_draw_ports_from() -> None:
    """An example's fixed app ports must not be ones `free_port` may hand to a test running beside
    it (CI runs the example READMEs next to other end-to-end tests): a port drawn there first made
    the example's app fail to bind ("address already in use") and a fifth of its connections fail."""
    from meshctl.localmesh import FREE_PORTS_FROM

    ephemeral_low = 32_768  # Linux's default start of ip_local_port_range, where `free_port` stops
    found = {(str(p.relative_to(EXAMPLES_DIR)), int(m.group(1)))
             for p in EXAMPLES_DIR.rglob("*") if p.is_file() and p.suffix in (".md", ".yaml", ".py")
             for m in _PORTISH.finditer(p.read_text(encoding="utf-8"))}
    inside = sorted((path, port) for path, port in found if FREE_PORTS_FROM <= port < ephemeral_low)
    assert inside == [], inside
    assert ("tcp-routes/mesh.yaml", 16432) in found  # the pattern does find the examples' ports
