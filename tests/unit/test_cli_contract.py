"""The contract every `meshctl` command keeps with people and scripts, checked by walking the click tree.

For every command and group reachable from `meshctl.cli:cli`:

- `--help` exits 0 and has an "Examples:" section with a `meshctl ...` line for that very command,
  and every example line, wherever it appears, names a real command and only options it has (parsed
  by the command's own click parser, so a renamed option breaks the test, not the reader);
- a command that prints data offers `-o/--output` with json and yaml, unless listed in `NO_OUTPUT`
  or `FORMAT_OPTION` with the reason;
- no command writes ANSI escape codes when stdout is not a terminal (every `--help`, and each
  command that works offline, run for real);
- README "## Exit codes" has a row for every command.

New commands are picked up by the walk: adding one without examples, `-o` or an exit-code row fails
here, by name.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner, Result

from meshctl.cli import cli

ROOT = Path(__file__).resolve().parents[2]
ANSI = "\x1b["

# Commands that print no data for scripts, or whose data has one fixed format: why no `-o json|yaml`.
NO_OUTPUT = {
    "up": "runs the control plane until stopped; prints log lines only",
    "demo": "runs a demo mesh for --duration; prints a live traffic view for people",
    "proxy run": "runs the workload's agent and Envoy until stopped; prints log lines only",
    "redirect": "--dry-run prints iptables-restore input, which has one format; else one status line",
    "completion": "prints a shell script",
    "kube-inject": "prints Kubernetes YAML manifests by nature (-o is the output file, as in istioctl)",
    "install": "--dry-run prints the YAML manifests it would apply; else one progress line per object",
}
# Commands whose data comes as json or yaml through another option than -o: which one, and why.
FORMAT_OPTION = {
    "proxy bootstrap": ("--format", "-o is the file to write, the bootstrap itself is YAML or JSON"),
}


def _sub(group: click.Group, name: str) -> click.Command | None:
    """A group's subcommand as click finds it (a lazy group imports it now)."""
    return group.get_command(click.Context(group), name)


def _walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name in command.list_commands(click.Context(command)):
            sub = _sub(command, name)
            assert sub is not None, f"meshctl {' '.join((*path, name))} is listed but cannot be loaded"
            yield from _walk(sub, (*path, name))


COMMANDS = dict(_walk(cli))
LEAVES = {path: cmd for path, cmd in COMMANDS.items() if not isinstance(cmd, click.Group)}


def _id(path: tuple[str, ...]) -> str:
    return " ".join(("meshctl", *path))


def run(*args: str, stdin: str | None = None) -> Result:
    """`meshctl ARGS` with output captured: stdout is not a terminal."""
    return CliRunner().invoke(cli, list(args), input=stdin, prog_name="meshctl")


def _help(path: tuple[str, ...]) -> str:
    result = run(*path, "--help")
    assert result.exit_code == 0, result.output
    return result.output


def _examples(text: str) -> list[str]:
    """The shell lines of the help's "Examples:" section (up to the next unindented-ish paragraph)."""
    _, sep, rest = text.partition("Examples:")
    assert sep, f"no 'Examples:' section in:\n{text}"
    lines: list[str] = []
    for line in rest.splitlines()[1:]:
        if not line.strip():
            if lines:
                break
            continue
        lines.append(line.strip())
    return lines


def _meshctl_argv(line: str) -> list[str] | None:
    """The argv of the `meshctl` invocation in a shell line (after `source <(`, `&&`, ...), up to the
    first pipe, redirection, `;` or comment; None when the line runs no meshctl."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    if "meshctl" not in tokens:
        return None
    argv: list[str] = []
    for token in tokens[tokens.index("meshctl") + 1:]:
        if token and all(ch in "();<>|&" for ch in token):
            break
        argv.append(token)
    return argv


def _resolve(argv: list[str]) -> tuple[tuple[str, ...], click.Command, list[str]]:
    """The command an argv names (descending through groups) and the arguments left for it."""
    command: click.Command = cli
    path: tuple[str, ...] = ()
    rest = list(argv)
    while isinstance(command, click.Group) and rest and (sub := _sub(command, rest[0])) is not None:
        path = (*path, rest.pop(0))
        command = sub
    return path, command, rest


def _check_parses(line: str, path: tuple[str, ...], command: click.Command, args: list[str]) -> None:
    """`args` parse on `command`: options it has, with a value where one is needed, choices it offers,
    no positional arguments beyond its own. Types other than choices are not converted (a path in an
    example need not exist here)."""
    ctx = command.make_context(_id(path), [], resilient_parsing=True)
    parser = command.make_parser(ctx)
    ctx.resilient_parsing = False  # now unknown options and missing values raise
    try:
        opts, extra, _ = parser.parse_args(list(args))
    except click.UsageError as exc:
        pytest.fail(f"example {line!r}: {exc.format_message()}")
    assert not extra, f"example {line!r}: arguments {extra} beyond what `{_id(path)}` takes"
    for param in command.params:
        value = opts.get(param.name) if param.name else None
        if isinstance(param.type, click.Choice) and isinstance(value, str):
            assert value in param.type.choices, f"example {line!r}: {value!r} is not one of {param.type.choices}"


@pytest.mark.parametrize("path", list(COMMANDS), ids=_id)
def test_help_exits_0_with_examples_for_this_command(path: tuple[str, ...]) -> None:
    text = _help(path)
    assert ANSI not in text
    named: list[tuple[str, ...]] = []
    for line in _examples(text):
        argv = _meshctl_argv(line)
        if argv is None:
            continue
        target, command, args = _resolve(argv)
        assert not isinstance(command, click.Group) or not args or args[0].startswith("-"), \
            f"example {line!r}: {args[0]!r} is no subcommand of `{_id(target)}`"
        _check_parses(line, target, command, args)
        named.append(target)
    assert any(target[:len(path)] == path for target in named), \
        f"`{_id(path)} --help` has no example running `{_id(path)}`; its examples run {sorted(set(named))}"


@pytest.mark.parametrize(("line", "why"), [
    ("meshctl version --no-such-flag", "No such option"),
    ("meshctl version -o xml", "is not one of"),
    ("meshctl proxy-config clusters frontend extra", "beyond what"),
    ("meshctl analyze -f", "requires an argument"),
])
def test_the_example_checker_catches_a_broken_example(line: str, why: str) -> None:
    argv = _meshctl_argv(line)
    assert argv is not None
    path, command, args = _resolve(argv)
    with pytest.raises((pytest.fail.Exception, AssertionError), match=why):
        _check_parses(line, path, command, args)


def test_example_lines_are_read_as_a_shell_would() -> None:
    assert _meshctl_argv("source <(meshctl completion bash)   # this shell") == ["completion", "bash"]
    assert _meshctl_argv("kubectl apply -f a.yaml && meshctl wait -k -f a.yaml | jq .") == \
        ["wait", "-k", "-f", "a.yaml"]
    assert _meshctl_argv("meshctl x simulate web http://w/ -H 'x-user: jason' # c") == \
        ["x", "simulate", "web", "http://w/", "-H", "x-user: jason"]
    assert _meshctl_argv("kubectl get pods") is None
    assert _resolve(["proxy-config", "log", "web"])[0] == ("proxy-config", "log")


def _output_choices(command: click.Command, flag: str) -> set[str]:
    for param in command.params:
        if isinstance(param, click.Option) and flag in param.opts and isinstance(param.type, click.Choice):
            return {str(c) for c in param.type.choices}
    return set()


@pytest.mark.parametrize("path", list(LEAVES), ids=_id)
def test_commands_that_print_data_offer_json_and_yaml(path: tuple[str, ...]) -> None:
    key = " ".join(path)
    command = LEAVES[path]
    if key in NO_OUTPUT:
        assert "-o" not in _option_flags(command) or key == "kube-inject", \
            f"`{_id(path)}` has -o now: drop it from NO_OUTPUT"
        return
    flag = FORMAT_OPTION.get(key, ("--output", ""))[0]
    assert {"json", "yaml"} <= _output_choices(command, flag), \
        f"`{_id(path)}` prints data but has no {flag} json|yaml (or list it in NO_OUTPUT with why)"
    if flag == "--output":
        assert "-o" in _option_flags(command)


def _option_flags(command: click.Command) -> set[str]:
    return {flag for param in command.params if isinstance(param, click.Option) for flag in param.opts}


def test_the_exception_lists_name_real_commands() -> None:
    keys = {" ".join(path) for path in LEAVES}
    assert set(NO_OUTPUT) <= keys
    assert set(FORMAT_OPTION) <= keys


# --- offline runs: real output, never a colour code off a terminal ----------------------------------------------------

POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  containers: [{name: web, image: nginx, ports: [{containerPort: 8080}]}]
"""
CANARY = str(ROOT / "examples" / "canary" / "mesh.yaml")

OFFLINE: dict[str, tuple[list[str], str | None]] = {
    "analyze": (["analyze", "-f", CANARY], None),
    "analyze json": (["analyze", "-f", CANARY, "-o", "json"], None),
    "describe service": (["describe", "service", "reviews", "-f", CANARY], None),
    "describe service yaml": (["describe", "service", "reviews", "-f", CANARY, "-o", "yaml"], None),
    "describe workload": (["describe", "workload", "default/reviews-v1", "-f", CANARY], None),
    "kube-inject": (["kube-inject", "-f", "-"], POD),
    "install --dry-run": (["install", "--dry-run"], None),
    "uninstall --dry-run": (["uninstall", "--dry-run"], None),
    "uninstall --dry-run json": (["uninstall", "--dry-run", "--purge", "-o", "json"], None),
    "redirect --dry-run": (["redirect", "--dry-run"], None),
    "completion bash": (["completion", "bash"], None),
    "version": (["version", "--remote=false"], None),
    "version json": (["version", "--remote=false", "-o", "json"], None),
    "proxy bootstrap": (["proxy", "bootstrap", "--workload", "default/web", "--address", "127.0.9.1"], None),
}


@pytest.mark.parametrize("name", list(OFFLINE))
def test_offline_output_has_no_ansi_codes_off_a_terminal(name: str) -> None:
    args, stdin = OFFLINE[name]
    result = run(*args, stdin=stdin)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip(), f"`meshctl {' '.join(args)}` printed nothing"
    assert ANSI not in result.output
    if "json" in args:
        json.loads(result.stdout)
    elif "yaml" in args:
        assert yaml.safe_load(result.stdout) is not None


def test_uninstall_dry_run_json_lists_what_it_would_delete_in_order() -> None:
    plain = run("uninstall", "--dry-run", "--purge").stdout.splitlines()
    data = json.loads(run("uninstall", "--dry-run", "--purge", "-o", "json").stdout)
    assert len(data) == len(plain)
    assert [set(item) for item in data] == [{"kind", "name", "namespace"}] * len(data)
    assert data[0]["kind"].endswith("WebhookConfiguration")  # the webhooks go first, so no pod waits on them
    assert {"kind": "Namespace", "name": "istio-system", "namespace": None} in data
    assert all(item["name"] in line and item["kind"] in line for item, line in zip(data, plain, strict=True))


# --- exit codes, documented for scripts -------------------------------------------------------------------------------

def _exit_code_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    _, sep, rest = readme.partition("\n## Exit codes\n")
    assert sep, "README has no '## Exit codes' section"
    return rest.split("\n## ", 1)[0]


@pytest.mark.parametrize("path", list(LEAVES), ids=_id)
def test_readme_documents_the_exit_codes_of_every_command(path: tuple[str, ...]) -> None:
    rows = [line for line in _exit_code_section().splitlines() if line.startswith("| `")]
    names = {m for row in rows for m in re.findall(r"`([^`]+)`", row.split("|")[1])}
    assert " ".join(path) in names, f"README '## Exit codes' has no row for `{' '.join(path)}`"
