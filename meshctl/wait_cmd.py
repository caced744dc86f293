"""`meshctl wait --for=applied -f FILE`: return once every affected proxy ACKed the objects in FILE
(`--for=delete`: their removal).

For each object of the files, meshctl polls pilot's `/debug/config_distribution` (every 0.2 s, one
GET per object) until pilot holds exactly that content (the same content hash as the file's; with
`-k`, the object's current `metadata.generation` in the cluster, read once at the start) and every
proxy whose config the change touched ACKed it. It stops early on a failure that waiting cannot
mend: pilot rejected the object, a proxy NACKed it (Envoy's message is printed), or pilot could not
generate a proxy's config. Proxies that disconnected before ACKing are listed, not waited for: they
get the new config when they reconnect.

`--for=delete` waits for the objects' removal the same way: pilot no longer holds them (the store
remembers the revision of each removal) and every proxy whose config the removal changed ACKed it.
An object pilot holds no record of is done at once.

Exit codes: 0 applied; 1 rejected by pilot, NACKed by a proxy, or not generated; 2 bad usage or a
file pilot would reject; 3 pilot (or, with -k, the cluster) unreachable; 4 timed out, listing the
proxies still pending and why.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click

from meshctl.inspect_http import get_json, http_base
from meshctl.output import OK, PROBLEM, UNREACHABLE, UnreachableError, console, emit
from meshctl.proxy_target import debug_option
from pilot.api import ApiObject
from pilot.config.yaml_dir import load_file
from pilot.distribution import content_hash

TIMED_OUT = 4
POLL_SECONDS = 0.2
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

EXAMPLES = """
\b
Examples:
  meshctl wait --for=applied -f reviews-vs.yaml          # after editing the file in pilot's config dir
  kubectl apply -f reviews-vs.yaml && meshctl wait --for=applied -k -f reviews-vs.yaml --timeout 1m
  meshctl wait --for=applied -f a.yaml -f b.yaml -o json | jq '.objects[].proxies'
  kubectl delete -f reviews-vs.yaml && meshctl wait --for=delete -f reviews-vs.yaml

\b
Exit codes: 0 applied to every affected proxy; 1 pilot rejected an object, a proxy NACKed it or
pilot could not generate a proxy's config; 2 bad usage or an invalid file; 3 pilot or the cluster
cannot be reached; 4 timed out (the proxies still pending are listed, with why).
"""


def parse_duration(text: str) -> float:
    """`30s`, `1m`, `500ms`, `1.5h` or plain seconds, as seconds; ValueError names the value."""
    found = _DURATION.match(text.strip())
    if not found:
        raise ValueError(f"{text!r} is not a duration (like 30s, 2m, 500ms)")
    return float(found.group(1)) * _UNITS[found.group(2)]


@dataclass(frozen=True)
class Wanted:
    """One object to wait for: its key and the version of it pilot must hold."""

    kind: str
    namespace: str
    name: str
    content_hash: str = ""  # local files: pilot's hash of the object must equal this
    generation: int | None = None  # -k: pilot's object must carry this metadata.generation (or newer)
    deleted: bool = False  # --for=delete: pilot must no longer hold it, and proxies must have ACKed that

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass
class Outcome:
    """Where one object stands after a look at pilot: `state` is applied, pending or failed."""

    wanted: Wanted
    state: str = "pending"
    reason: str = ""
    report: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        w = self.wanted
        return {"kind": w.kind, "namespace": w.namespace, "name": w.name, "state": self.state,
                "reason": self.reason, "pilot": dict(self.report)}


def judge(wanted: Wanted, report: Mapping[str, Any]) -> Outcome:
    """Pure: what pilot's `/debug/config_distribution` answer means for `wanted`."""
    status = report.get("status")
    rejected = str(report.get("rejected") or "")
    if wanted.deleted:
        if status == "found":
            return Outcome(wanted, "pending", f"pilot still holds it (revision {report.get('revision')})", report)
        if status != "deleted":  # not held, and no removal on record: nothing any proxy could still hold
            return Outcome(wanted, "applied", "pilot does not hold it (it keeps no record of a removal)", report)
        return _proxies_outcome(wanted, report)
    if status == "rejected":
        return Outcome(wanted, "failed", f"pilot rejected it: {rejected}", report)
    if status != "found":
        return Outcome(wanted, "pending", "pilot does not hold it yet", report)
    if not _holds(wanted, report):
        if rejected:
            return Outcome(wanted, "failed", f"pilot rejected this version and serves the previous one: {rejected}",
                           report)
        held = (f"generation {report.get('generation')}" if wanted.generation is not None
                else f"content {report.get('content_hash')}")
        return Outcome(wanted, "pending", f"pilot still holds an older version ({held})", report)
    return _proxies_outcome(wanted, report)


def _proxies_outcome(wanted: Wanted, report: Mapping[str, Any]) -> Outcome:
    """Applied once no affected proxy is pending; failed if one NACKed or was not generated."""
    proxies = report.get("proxies", [])
    failed = [p for p in proxies if p["state"] in ("NACKED", "NOT_GENERATED")]
    if failed:
        return Outcome(wanted, "failed", "; ".join(f'{p["proxy"]}: {p["reason"]}' for p in failed), report)
    pending = [p for p in proxies if p["state"] == "PENDING"]
    if pending:
        return Outcome(wanted, "pending", "; ".join(f'{p["proxy"]}: {p["reason"]}' for p in pending), report)
    return Outcome(wanted, "applied", "", report)


def _holds(wanted: Wanted, report: Mapping[str, Any]) -> bool:
    if wanted.generation is not None:
        held = report.get("generation")
        return isinstance(held, int) and held >= wanted.generation
    return report.get("content_hash") == wanted.content_hash


def wanted_from_files(files: Sequence[Path]) -> list[tuple[Wanted, ApiObject]]:
    """Each object of the files with its content hash; UsageError naming the file, resource and reason
    for a document pilot would reject."""
    out: list[tuple[Wanted, ApiObject]] = []
    for path in files:
        loaded = load_file(path)
        if loaded.errors:
            raise click.UsageError("; ".join(str(e) for e in loaded.errors))
        for obj in loaded.objects:
            kind, namespace, name = obj.key
            out.append((Wanted(kind, namespace, name, content_hash=content_hash(obj)), obj))
    if not out:
        raise click.UsageError(f"no mesh objects in {', '.join(map(str, files))}")
    return out


@click.command("wait", epilog=EXAMPLES)
@click.option("--for", "condition", type=click.Choice(["applied", "delete"]), default="applied", show_default=True,
              help="applied: pilot holds the objects and every proxy they affect ACKed them. delete: pilot "
                   "no longer holds them and every proxy their removal affects ACKed that.")
@click.option("-f", "--filename", "files", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="YAML file of the objects (repeat).")
@click.option("-k", "--k8s", "kube", is_flag=True,
              help="The objects live in a cluster: wait for their current generation there, not the file's content.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False, path_type=Path), envvar="KUBECONFIG", default=None,
              help="kubeconfig for -k [$KUBECONFIG, else ~/.kube/config].")
@click.option("--context", "kube_context", default=None, help="kubeconfig context for -k.")
@debug_option
@click.option("--timeout", default="30s", show_default=True, help="Give up after this long (30s, 2m, 500ms).")
@click.option("-o", "--output", type=click.Choice(["text", "json", "yaml"]), default="text", show_default=True,
              help="text for people; json or yaml: each object's state and pilot's per-proxy report.")
def wait(condition: str, files: tuple[Path, ...], kube: bool, kubeconfig: Path | None, kube_context: str | None,
         debug_addr: str, timeout: str, output: str) -> None:
    """Wait until the objects in the files are applied (or, --for=delete, removed): every proxy whose
    config they change ACKed it.

    Reports which proxies did not and why (NACKed with Envoy's message, pending, disconnected).
    """
    try:
        seconds = parse_duration(timeout)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--timeout") from None
    found = wanted_from_files(files)
    if condition == "delete":
        found = [(replace(w, content_hash="", deleted=True), obj) for w, obj in found]
    elif kube:
        found = asyncio.run(_cluster_generations(found, kubeconfig or Path.home() / ".kube" / "config", kube_context))
    outcomes, timed_out = asyncio.run(_wait([w for w, _ in found], debug_addr, seconds))
    code = _exit_code(outcomes, timed_out)
    if output == "text":
        _print(outcomes, code)
    else:
        emit({"applied": code == OK, "exit_code": code, "objects": [o.as_dict() for o in outcomes]}, output)
    raise SystemExit(code)


async def _wait(wanted: Sequence[Wanted], debug_addr: str, seconds: float) -> tuple[list[Outcome], bool]:
    deadline = time.monotonic() + seconds
    url = f"{http_base(debug_addr)}/debug/config_distribution"
    while True:
        outcomes = [judge(w, await get_json(url, {"kind": w.kind, "namespace": w.namespace, "name": w.name}))
                    for w in wanted]
        if all(o.state == "applied" for o in outcomes) or any(o.state == "failed" for o in outcomes):
            return outcomes, False
        if time.monotonic() >= deadline:
            return outcomes, True
        await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


async def _cluster_generations(found: list[tuple[Wanted, ApiObject]], kubeconfig: Path,
                               context: str | None) -> list[tuple[Wanted, ApiObject]]:
    """Each object's current `metadata.generation` in the cluster (one GET each)."""
    from kubernetes_asyncio.client import ApiException, CustomObjectsApi

    from meshctl.crds import NAMES
    from pilot.kube.client import KubeConfigError, client_from_kubeconfig

    try:
        client = await client_from_kubeconfig(kubeconfig, context)
    except KubeConfigError as exc:
        raise UnreachableError(str(exc)) from None
    out = []
    async with client:
        api = CustomObjectsApi(client)
        for wanted, obj in found:
            group, _, version = obj.api_version.rpartition("/")
            plural = NAMES[wanted.kind].plural
            try:
                live = await api.get_namespaced_custom_object(group, version, wanted.namespace, plural, wanted.name)
            except ApiException as exc:
                if exc.status == 404:
                    raise click.ClickException(f"{wanted.label} is not in the cluster (apply it first)") from None
                raise UnreachableError(f"cannot read {wanted.label} from the cluster: {exc.status} {exc.reason}") \
                    from None
            except OSError as exc:
                raise UnreachableError(f"cannot reach the cluster ({kubeconfig}): {exc}") from None
            generation = int(live.get("metadata", {}).get("generation") or 0)
            out.append((Wanted(wanted.kind, wanted.namespace, wanted.name, generation=generation), obj))
    return out


def _exit_code(outcomes: Sequence[Outcome], timed_out: bool) -> int:
    if any(o.state == "failed" for o in outcomes):
        return PROBLEM
    if timed_out:
        return TIMED_OUT
    return OK


def _print(outcomes: Sequence[Outcome], code: int) -> None:
    out = console()
    for o in outcomes:
        report = o.report
        gone = [p for p in report.get("proxies", []) if p["state"] == "DISCONNECTED"]
        if o.state == "applied" and o.wanted.deleted and report.get("status") != "deleted":
            out.print(f"[green]deleted[/] {o.wanted.label}: {o.reason}", highlight=False)
        elif o.state == "applied":
            acked = sum(1 for p in report.get("proxies", []) if p["state"] == "ACKED")
            word = "deleted" if o.wanted.deleted else "applied"
            out.print(f"[green]{word}[/] {o.wanted.label} (revision {report.get('revision')}): ACKed by {acked} "
                      f"affected proxies; {report.get('unaffected', 0)} not affected", highlight=False)
        else:
            style = "bold red" if o.state == "failed" else "yellow"
            word = "FAILED" if o.state == "failed" else ("TIMED OUT" if code == TIMED_OUT else "pending")
            out.print(f"[{style}]{word}[/] {o.wanted.label}: {o.reason}", highlight=False)
        for p in gone:
            out.print(f"  {p['proxy']}: {p['reason']}", highlight=False)


__all__ = ["OK", "PROBLEM", "TIMED_OUT", "UNREACHABLE", "judge", "parse_duration", "wait"]
