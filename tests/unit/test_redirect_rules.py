"""The init container's capture rules (`injector.redirect`): golden rule sets per annotation
combination, validation messages, and the `meshctl redirect` command's dry run.

Goldens live in `redirect_goldens/<case>.rules` (the `iptables-restore` input); regenerate with
`pytest tests/unit/test_redirect_rules.py --update-goldens` and review the diff. That the rules
do what they say inside a real network namespace is `tests/k8s/test_pod_sandbox.py`'s job.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from injector.redirect import (
    ANNOTATION_PREFIX,
    RedirectConfigError,
    command_args,
    nat_rules,
    options_from_annotations,
    parse_options,
    restore_text,
    stale_jumps,
)
from injector.redirect_cmd import redirect
from meshctl.cli import cli

GOLDENS = Path(__file__).parent / "redirect_goldens"

# case name -> the pod's traffic.sidecar.istio.io/* annotations (without prefix)
CASES: dict[str, dict[str, str]] = {
    "defaults": {},
    "explicit-defaults": {"includeOutboundIPRanges": "*", "includeInboundPorts": "*", "excludeInboundPorts": ""},
    "exclude-outbound-ip-ranges": {"excludeOutboundIPRanges": "10.96.0.0/12, 192.168.1.7/32,fd00::/8"},
    "include-outbound-ip-ranges": {"includeOutboundIPRanges": "10.96.0.0/12,10.244.0.0/16"},
    "include-outbound-ip-ranges-empty": {"includeOutboundIPRanges": ""},
    "include-outbound-loopback": {"includeOutboundIPRanges": "127.0.0.0/8,10.0.0.0/8"},
    "include-inbound-ports": {"includeInboundPorts": "9080,8080", "excludeInboundPorts": "8080"},
    "include-inbound-ports-empty": {"includeInboundPorts": ""},
    "exclude-inbound-ports": {"excludeInboundPorts": "9090,15021"},
    "exclude-outbound-ports-single": {"excludeOutboundPorts": "5432"},
    "exclude-outbound-ports-many": {"excludeOutboundPorts": ",".join(str(p) for p in range(3000, 3020))},
    "include-outbound-ports": {"includeOutboundIPRanges": "", "includeOutboundPorts": "443,80"},
    "combined": {
        "includeOutboundIPRanges": "10.0.0.0/8", "excludeOutboundIPRanges": "10.96.0.1/32",
        "includeInboundPorts": "*", "excludeInboundPorts": "3306",
        "includeOutboundPorts": "8443", "excludeOutboundPorts": "25,587",
    },
}


def test_every_golden_has_a_case(update_goldens: bool) -> None:
    """A golden without a case tests nothing; with --update-goldens it is removed."""
    stale = {p.stem for p in GOLDENS.glob("*.rules")} - set(CASES)
    if update_goldens:
        for name in stale:
            (GOLDENS / f"{name}.rules").unlink()
    else:
        assert not stale, f"goldens without a case in CASES: {sorted(stale)}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_rules_match_golden(case: str, update_goldens: bool) -> None:
    actual = restore_text(parse_options(CASES[case]))
    golden = GOLDENS / f"{case}.rules"
    if update_goldens:
        GOLDENS.mkdir(exist_ok=True)
        golden.write_text(actual)
        return
    assert golden.is_file(), f"no golden for {case}; run with --update-goldens"
    assert actual == golden.read_text(), f"{case}: rules differ from {golden.name}"


def test_defaults_capture_everything_but_the_proxy() -> None:
    """Spot checks of the facts the goldens encode, so a regenerated golden cannot lose them."""
    rules = nat_rules(parse_options({}))
    assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" in rules
    assert "-A ISTIO_INBOUND -p tcp -m multiport --dports 15020,15021,15090 -j RETURN" in rules
    assert rules.index("-A ISTIO_INBOUND -p tcp -m multiport --dports 15020,15021,15090 -j RETURN") < rules.index(
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN" in rules
    assert "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN" in rules
    assert "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN" in rules
    assert rules[-1] == "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"


def test_empty_inbound_include_list_captures_no_inbound() -> None:
    rules = nat_rules(parse_options({"includeInboundPorts": ""}))
    assert not [r for r in rules if r.startswith("-A PREROUTING")]
    assert not [r for r in rules if r.endswith("-j ISTIO_IN_REDIRECT") and r.startswith("-A ISTIO_INBOUND")]


def test_ipv6_ranges_are_accepted_but_add_no_ipv4_rule() -> None:
    opts = parse_options({"excludeOutboundIPRanges": "fd00::/8", "includeOutboundIPRanges": "2001:db8::/32"})
    rules = nat_rules(opts)
    assert not [r for r in rules if "::" in r]
    assert not [r for r in rules if r.startswith("-A ISTIO_OUTPUT") and r.endswith("-j ISTIO_REDIRECT")]


def test_custom_proxy_identity_and_ports() -> None:
    text = restore_text(parse_options({}, proxy_uid=2000, proxy_gid=3000, outbound_port=16001, inbound_port=16006))
    assert "--uid-owner 2000" in text and "--gid-owner 3000" in text
    assert "--uid-owner 1337" not in text and "--gid-owner 1337" not in text
    assert "--to-ports 16001" in text and "--to-ports 16006" in text


@pytest.mark.parametrize(("annotation", "value", "reason"), [
    ("excludeInboundPorts", "8080,http", "has 'http', not a port number in 1..65535"),
    ("includeInboundPorts", "0", "has '0', not a port number in 1..65535"),
    ("excludeOutboundPorts", "65536", "has '65536', not a port number in 1..65535"),
    ("includeOutboundPorts", "-1", "has '-1', not a port number in 1..65535"),
    # str.isdigit() takes these, int() does not (or reads them as Arabic-Indic digits): not ports
    ("includeInboundPorts", "\u00b2", "has '\u00b2', not a port number in 1..65535"),
    ("excludeInboundPorts", "\u0668\u0660", "not a port number in 1..65535"),
    ("excludeOutboundIPRanges", "*", "cannot be '*'"),
    ("excludeOutboundIPRanges", "10.0.0.1", "has '10.0.0.1', not a CIDR"),
    ("includeOutboundIPRanges", "10.0.0.0/33", "has '10.0.0.0/33', not a CIDR"),
    ("includeOutboundIPRanges", "10.0.0.0/8,bogus/8", "has 'bogus/8', not a CIDR"),
])
def test_bad_values_name_the_annotation_the_value_and_the_reason(annotation: str, value: str, reason: str) -> None:
    with pytest.raises(RedirectConfigError) as info:
        parse_options({annotation: value})
    message = str(info.value)
    assert message.startswith(f"annotation traffic.sidecar.istio.io/{annotation}: {value!r} ")
    assert reason in message
    assert info.value.annotation == annotation and info.value.value == value


def test_unknown_option_is_refused_with_the_known_ones() -> None:
    with pytest.raises(RedirectConfigError, match=r"includeInboundPort\b.*not a known option.*includeInboundPorts"):
        parse_options({"includeInboundPort": "80"})


def test_options_from_annotations_takes_only_traffic_annotations() -> None:
    annotations = {ANNOTATION_PREFIX + "excludeInboundPorts": "9090", "sidecar.istio.io/inject": "true",
                   "traffic.sidecar.istio.io/kubevirtInterfaces": "net1"}
    assert options_from_annotations(annotations) == {"excludeInboundPorts": "9090"}


def test_command_args_omit_defaults_keep_a_fixed_order_and_validate() -> None:
    assert command_args({}) == []
    assert command_args({"includeOutboundIPRanges": "*", "includeInboundPorts": "*"}) == []
    assert command_args({"excludeOutboundPorts": "25", "excludeOutboundIPRanges": " 10.0.0.0/8 "}) == [
        "--exclude-outbound-ip-ranges", "10.0.0.0/8", "--exclude-outbound-ports", "25"]
    with pytest.raises(RedirectConfigError, match="excludeOutboundPorts"):
        command_args({"excludeOutboundPorts": "smtp"})


def test_command_args_give_the_same_rules_through_the_cli() -> None:
    """What the injector puts in the init container is what the command then installs."""
    values = CASES["combined"]
    result = CliRunner().invoke(cli, ["redirect", "--dry-run", *command_args(values)])
    assert result.exit_code == 0, result.output
    assert result.output == restore_text(parse_options(values))


def test_cli_refuses_a_bad_value_naming_the_annotation() -> None:
    result = CliRunner().invoke(redirect, ["--dry-run", "--exclude-inbound-ports", "80,abc"])
    assert result.exit_code == 2
    assert "annotation traffic.sidecar.istio.io/excludeInboundPorts: '80,abc' has 'abc'" in result.output


SAVED = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
-A OUTPUT -j ISTIO_OUTPUT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_OUTPUT - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -j ISTIO_OUTPUT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""


def test_rerun_deletes_earlier_jumps_and_leaves_other_rules() -> None:
    assert stale_jumps(SAVED) == ["-D PREROUTING -p tcp -j ISTIO_INBOUND", "-D OUTPUT -j ISTIO_OUTPUT",
                                  "-D OUTPUT -j ISTIO_OUTPUT"]
    text = restore_text(parse_options({}), SAVED)
    lines = text.splitlines()
    assert lines.index("-D OUTPUT -j ISTIO_OUTPUT") < lines.index("-A OUTPUT -j ISTIO_OUTPUT")
    assert "KUBE-SERVICES" not in text
    assert stale_jumps("") == []


ports = st.lists(st.integers(1, 65535), max_size=40).map(lambda ps: ",".join(map(str, ps)))
cidrs = st.lists(st.ip_addresses(v=4).flatmap(lambda a: st.integers(0, 32).map(lambda n: f"{a}/{n}")),
                 max_size=6).map(",".join)


@given(inc=st.one_of(st.just("*"), cidrs), exc=cidrs, inbound=st.one_of(st.just("*"), ports), ex_in=ports,
       inc_out=ports, exc_out=ports)
def test_any_valid_options_give_well_formed_rules(inc: str, exc: str, inbound: str, ex_in: str, inc_out: str,
                                                   exc_out: str) -> None:
    opts = parse_options({"includeOutboundIPRanges": inc, "excludeOutboundIPRanges": exc,
                          "includeInboundPorts": inbound, "excludeInboundPorts": ex_in,
                          "includeOutboundPorts": inc_out, "excludeOutboundPorts": exc_out})
    rules = nat_rules(opts)
    assert rules == nat_rules(opts)  # deterministic
    for rule in rules:
        chain = rule.split()[1]
        assert chain in {"PREROUTING", "OUTPUT", "ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"}
        if "--dports" in rule:
            assert len(rule.split("--dports ")[1].split()[0].split(",")) <= 15
    assert rules.count("-A OUTPUT -j ISTIO_OUTPUT") == 1
