"""Golden tests for the whole translation pipeline: YAML in, xDS (as YAML) out, per proxy class.

Each ``cases/<case>/`` holds ``input.yaml`` (Istio config), ``proxies.yaml`` (name -> ProxyClass
fields) and one ``<name>.golden.yaml`` per proxy. Regenerate with
``pytest tests/golden --update-goldens`` and review the diff.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from pilot.config import load_file
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.xds import typeurls
from pilot.xds.snapshot import Snapshot

CASES = Path(__file__).parent / "cases"
SECTIONS = {
    typeurls.CLUSTER: "clusters",
    typeurls.ENDPOINT: "endpoints",
    typeurls.LISTENER: "listeners",
    typeurls.ROUTE: "routes",
}


def case_dirs() -> list[Path]:
    return sorted(p for p in CASES.iterdir() if p.is_dir())


def read_proxies(case: Path) -> dict[str, ProxyClass]:
    raw: dict[str, dict[str, Any]] = yaml.safe_load((case / "proxies.yaml").read_text())
    return {
        name: ProxyClass(
            kind=ProxyKind(spec.get("kind", "sidecar")),
            namespace=spec["namespace"],
            labels=tuple(sorted((spec.get("labels") or {}).items())),
            bind_address=spec.get("bindAddress"),
            workload=spec.get("workload"),
            mtls=spec.get("mtls", False),
            captured=spec.get("captured", False),
        )
        for name, spec in raw.items()
    }


def render(case: Path, proxy: ProxyClass) -> str:
    loaded = load_file(case / "input.yaml", display_name="input.yaml")
    assert loaded.errors == (), [str(e) for e in loaded.errors]
    mesh = build_mesh(loaded.objects)
    resources = generate(mesh, proxy)
    assert Snapshot.from_resources(resources).consistency_errors() == []
    doc: dict[str, Any] = {"meshWarnings": list(mesh.warnings)}
    for type_url, section in SECTIONS.items():
        msgs = resources[type_url]
        assert list(msgs) == sorted(msgs), f"{section} not sorted by name"
        # Through JSON text: MessageToDict nests OrderedDicts for Any fields, which YAML cannot dump.
        doc[section] = [json.loads(json_format.MessageToJson(msgs[name])) for name in msgs]
    return yaml.safe_dump(doc, sort_keys=True, width=120)


@pytest.mark.parametrize("case", case_dirs(), ids=lambda p: p.name)
def test_case(case: Path, update_goldens: bool) -> None:
    assert (case / "input.yaml").is_file(), f"{case.name}: golden case without input.yaml"
    proxies = read_proxies(case)
    expected_files = {f"{name}.golden.yaml" for name in proxies}
    stale = {p.name for p in case.glob("*.golden.yaml")} - expected_files
    if update_goldens:
        for name in stale:
            (case / name).unlink()
    else:
        assert not stale, f"{case.name}: goldens with no proxy in proxies.yaml: {sorted(stale)}"
    for name, proxy in proxies.items():
        golden = case / f"{name}.golden.yaml"
        actual = render(case, proxy)
        if update_goldens:
            golden.write_text(actual)
            continue
        assert golden.is_file(), f"{case.name}: no golden for proxy {name}; run with --update-goldens"
        assert actual == golden.read_text(), f"{case.name}/{name}: output differs from golden"


def test_every_case_has_inputs() -> None:
    """A directory of goldens without an input (or proxies) is a test that silently tests nothing."""
    for case in case_dirs():
        assert (case / "input.yaml").is_file(), f"{case.name}: no input.yaml"
        assert (case / "proxies.yaml").is_file(), f"{case.name}: no proxies.yaml"
        assert read_proxies(case), f"{case.name}: proxies.yaml names no proxy"


def test_generation_is_deterministic() -> None:
    """Same input, same bytes: rendering twice (fresh mesh each time) gives identical versions."""
    for case in case_dirs():
        for proxy in read_proxies(case).values():
            assert render(case, proxy) == render(case, proxy)
