"""Traffic capture for a sidecar pod: Istio's `traffic.sidecar.istio.io/*` options -> nat rules.

Pure: `parse_options` validates the options (the annotation values as strings), `nat_rules` turns
them into the rule lines of the nat table, `restore_text` into the input of `iptables-restore
--noflush` that installs them idempotently. `injector.redirect_cmd` (the init container's command)
is the thin I/O edge that runs `iptables-save` / `iptables-restore` inside the pod's namespace.

Istio's chain design, kept as facts so existing habits and tooling fit:

- `PREROUTING -p tcp -> ISTIO_INBOUND`: connections arriving at the pod are sent to
  `ISTIO_IN_REDIRECT` (REDIRECT to 15006), except the tunnel port 15008, the proxy's own ports
  15090 (Envoy stats), 15021 (health) and 15020 (agent), and `excludeInboundPorts`; with a port
  list in `includeInboundPorts` only those ports are captured (and the exclusions do not apply).
- `OUTPUT -> ISTIO_OUTPUT`: connections the pod opens go to `ISTIO_REDIRECT` (REDIRECT to 15001),
  except those of the proxy's UID/GID 1337 (Envoy's own upstream connections, so no loop),
  `excludeOutboundPorts` (TCP and UDP), loopback destinations, `excludeOutboundIPRanges`; only
  destinations in `includeOutboundIPRanges` (`*`: all) or on `includeOutboundPorts` are captured.
- Loopback, as Istio: the inbound passthrough cluster connects from 127.0.0.6 over `lo` and is
  never captured; the proxy connecting to the pod's own non-loopback address over `lo` (an app
  calling its own service through the mesh) goes to the inbound listener; an app process talking
  to its own pod over `lo` is left alone unless loopback is in `includeOutboundIPRanges`.

REDIRECT keeps the original destination in conntrack, where Envoy's `original_dst` listener filter
reads it (SO_ORIGINAL_DST). IPv4 only: IPv6 ranges are accepted (Istio accepts them) but produce
no rules, because test pods and the pod network here are IPv4; an IPv6 pod's traffic is not
captured. Costs nothing at run time beyond a few dozen rules evaluated per new connection (nat
rules see only the first packet of a connection).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

ANNOTATION_PREFIX: Final = "traffic.sidecar.istio.io/"
PROXY_UID: Final = 1337
PROXY_GID: Final = 1337
OUTBOUND_CAPTURE_PORT: Final = 15001
INBOUND_CAPTURE_PORT: Final = 15006
TUNNEL_PORT: Final = 15008
# Envoy's Prometheus stats, the sidecar's health port and the agent's merged-metrics port.
PROXY_INBOUND_PORTS: Final = (15090, 15021, 15020)
# 127.0.0.6 is the source the inbound passthrough cluster binds; 127.0.0.1/32 Istio's host loopback.
INBOUND_PASSTHROUGH_SOURCE: Final = "127.0.0.6/32"
HOST_LOOPBACK: Final = "127.0.0.1/32"
MULTIPORT_MAX: Final = 15  # the iptables multiport match takes at most 15 ports

INBOUND, IN_REDIRECT, OUTPUT, REDIRECT = "ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"
CHAINS: Final = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)

ALL: Final = "*"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The annotation (without prefix) of each option, its command-line flag and its default.
ANNOTATIONS: Final[Mapping[str, tuple[str, str]]] = {
    "includeOutboundIPRanges": ("--include-outbound-ip-ranges", ALL),
    "excludeOutboundIPRanges": ("--exclude-outbound-ip-ranges", ""),
    "includeInboundPorts": ("--include-inbound-ports", ALL),
    "excludeInboundPorts": ("--exclude-inbound-ports", ""),
    "includeOutboundPorts": ("--include-outbound-ports", ""),
    "excludeOutboundPorts": ("--exclude-outbound-ports", ""),
}


class RedirectConfigError(ValueError):
    """An option (a `traffic.sidecar.istio.io/*` annotation) whose value cannot be used."""

    def __init__(self, annotation: str, value: str, reason: str) -> None:
        super().__init__(f"annotation {ANNOTATION_PREFIX}{annotation}: {value!r} {reason}")
        self.annotation = annotation
        self.value = value
        self.reason = reason


@dataclass(frozen=True)
class RedirectOptions:
    """Validated capture options; `ALL` means every address or port. Build with `parse_options`."""

    include_outbound_ip_ranges: Literal["*"] | tuple[Network, ...] = ALL
    exclude_outbound_ip_ranges: tuple[Network, ...] = ()
    include_inbound_ports: Literal["*"] | tuple[int, ...] = ALL
    exclude_inbound_ports: tuple[int, ...] = ()
    include_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    proxy_uid: int = PROXY_UID
    proxy_gid: int = PROXY_GID
    outbound_port: int = OUTBOUND_CAPTURE_PORT
    inbound_port: int = INBOUND_CAPTURE_PORT


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _ports(annotation: str, value: str) -> tuple[int, ...]:
    ports: set[int] = set()
    for item in _items(value):
        if not (item.isascii() and item.isdigit()) or not 1 <= int(item) <= 65535:
            raise RedirectConfigError(annotation, value, f"has {item!r}, not a port number in 1..65535")
        ports.add(int(item))
    return tuple(sorted(ports))


def _ranges(annotation: str, value: str) -> tuple[Network, ...]:
    nets: set[Network] = set()
    for item in _items(value):
        if item == ALL:
            raise RedirectConfigError(annotation, value, "cannot be '*' (exclude every destination: do not inject)")
        if "/" not in item:
            raise RedirectConfigError(annotation, value, f"has {item!r}, not a CIDR (address/prefix length)")
        try:
            nets.add(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise RedirectConfigError(annotation, value, f"has {item!r}, not a CIDR (address/prefix length)") from None
    return tuple(sorted(nets, key=lambda n: (n.version, n)))


def parse_options(values: Mapping[str, str], *, proxy_uid: int = PROXY_UID, proxy_gid: int = PROXY_GID,
                  outbound_port: int = OUTBOUND_CAPTURE_PORT,
                  inbound_port: int = INBOUND_CAPTURE_PORT) -> RedirectOptions:
    """Validate option values keyed by annotation name without prefix (`includeInboundPorts`...).

    A missing key takes Istio's default; an unknown key or a bad value raises
    `RedirectConfigError` naming the annotation, the value and what is wrong with it.
    """
    for key in values:
        if key not in ANNOTATIONS:
            raise RedirectConfigError(key, values[key], f"is not a known option (known: {', '.join(ANNOTATIONS)})")
    got = {key: values.get(key, default) for key, (_flag, default) in ANNOTATIONS.items()}
    include_ranges, include_inbound = got["includeOutboundIPRanges"].strip(), got["includeInboundPorts"].strip()
    return RedirectOptions(
        include_outbound_ip_ranges=ALL if include_ranges == ALL else _ranges("includeOutboundIPRanges", include_ranges),
        exclude_outbound_ip_ranges=_ranges("excludeOutboundIPRanges", got["excludeOutboundIPRanges"]),
        include_inbound_ports=ALL if include_inbound == ALL else _ports("includeInboundPorts", include_inbound),
        exclude_inbound_ports=_ports("excludeInboundPorts", got["excludeInboundPorts"]),
        include_outbound_ports=_ports("includeOutboundPorts", got["includeOutboundPorts"]),
        exclude_outbound_ports=_ports("excludeOutboundPorts", got["excludeOutboundPorts"]),
        proxy_uid=proxy_uid, proxy_gid=proxy_gid, outbound_port=outbound_port, inbound_port=inbound_port,
    )


def options_from_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """The capture options among a pod's annotations, keyed by annotation name without prefix."""
    return {key: annotations[ANNOTATION_PREFIX + key] for key in ANNOTATIONS if ANNOTATION_PREFIX + key in annotations}


def command_args(values: Mapping[str, str]) -> list[str]:
    """The `meshctl redirect` flags for these option values (validated first), in a fixed order.

    The injector calls this with `options_from_annotations(pod annotations)`; a value equal to
    the default adds no flag, so an unannotated pod's init container is just `meshctl redirect`.
    """
    parse_options(values)
    args: list[str] = []
    for key, (flag, default) in ANNOTATIONS.items():
        if key in values and values[key].strip() != default:
            args += [flag, values[key].strip()]
    return args


def _port_matches(ports: Iterable[int]) -> list[str]:
    """`--dport N` or `-m multiport --dports a,b,...` (at most 15 ports each) for these ports."""
    ports = list(ports)
    if len(ports) == 1:
        return [f"--dport {ports[0]}"]
    return [f"-m multiport --dports {','.join(map(str, ports[i:i + MULTIPORT_MAX]))}"
            for i in range(0, len(ports), MULTIPORT_MAX)]


def _v4(nets: Iterable[Network]) -> list[str]:
    return [str(n) for n in nets if n.version == 4]


def _inbound_rules(opts: RedirectOptions) -> list[str]:
    rules = [f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {opts.inbound_port}",
             f"-A {INBOUND} -p tcp --dport {TUNNEL_PORT} -j RETURN"]
    if opts.include_inbound_ports == ALL:
        excluded = sorted({*PROXY_INBOUND_PORTS, *opts.exclude_inbound_ports})
        rules += [f"-A {INBOUND} -p tcp {m} -j RETURN" for m in _port_matches(excluded)]
        rules.append(f"-A {INBOUND} -p tcp -j {IN_REDIRECT}")
    else:
        rules += [f"-A {INBOUND} -p tcp --dport {p} -j {IN_REDIRECT}" for p in opts.include_inbound_ports]
    if opts.include_inbound_ports:  # an empty include list captures nothing: no jump at all
        rules.insert(0, f"-A PREROUTING -p tcp -j {INBOUND}")
    return rules


def _owner_rules(opts: RedirectOptions) -> list[str]:
    """The proxy's own traffic: to its pod over `lo` -> inbound listener; elsewhere -> uncaptured."""
    loopback_included = opts.include_outbound_ip_ranges != ALL and any(
        n.is_loopback for n in opts.include_outbound_ip_ranges)
    rules: list[str] = []
    for match in (f"--uid-owner {opts.proxy_uid}", f"--gid-owner {opts.proxy_gid}"):
        rules.append(f"-A {OUTPUT} -o lo ! -d {HOST_LOOPBACK} -p tcp ! --dport {TUNNEL_PORT} "
                     f"-m owner {match} -j {IN_REDIRECT}")
        if not loopback_included:
            rules.append(f"-A {OUTPUT} -o lo -m owner ! {match} -j RETURN")
        rules.append(f"-A {OUTPUT} -m owner {match} -j RETURN")
    return rules


def _outbound_rules(opts: RedirectOptions) -> list[str]:
    rules = [f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {opts.outbound_port}", f"-A OUTPUT -j {OUTPUT}"]
    for match in _port_matches(opts.exclude_outbound_ports) if opts.exclude_outbound_ports else []:
        rules += [f"-A {OUTPUT} -p tcp {match} -j RETURN", f"-A {OUTPUT} -p udp {match} -j RETURN"]
    rules.append(f"-A {OUTPUT} -o lo -s {INBOUND_PASSTHROUGH_SOURCE} -j RETURN")
    rules += _owner_rules(opts)
    rules.append(f"-A {OUTPUT} -d {HOST_LOOPBACK} -j RETURN")
    rules += [f"-A {OUTPUT} -d {net} -j RETURN" for net in _v4(opts.exclude_outbound_ip_ranges)]
    if opts.include_outbound_ports:
        rules += [f"-A {OUTPUT} -p tcp {m} -j {REDIRECT}" for m in _port_matches(opts.include_outbound_ports)]
    if opts.include_outbound_ip_ranges == ALL:
        rules.append(f"-A {OUTPUT} -j {REDIRECT}")
    else:
        rules += [f"-A {OUTPUT} -d {net} -j {REDIRECT}" for net in _v4(opts.include_outbound_ip_ranges)]
    return rules


def nat_rules(opts: RedirectOptions) -> list[str]:
    """The `-A` lines of the nat table, in evaluation order within each chain."""
    return _inbound_rules(opts) + _outbound_rules(opts)


def stale_jumps(saved: str) -> list[str]:
    """`-D` lines removing every jump from a built-in nat chain to one of our chains in `saved`.

    `saved` is `iptables-save -t nat` output from an earlier run (or empty); its rule specs are
    iptables' canonical form, which `-D` accepts as printed.
    """
    table, deletes = "", []
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        parts = line.split()
        if (table == "nat" and len(parts) >= 3 and parts[0] == "-A" and parts[1] in ("PREROUTING", "OUTPUT")
                and parts[-2] == "-j" and parts[-1] in CHAINS):
            deletes.append("-D" + line[2:])
    return deletes


def restore_text(opts: RedirectOptions, saved: str = "") -> str:
    """Input for `iptables-restore --noflush`: replace our chains' rules, whatever ran before.

    Declaring a chain creates it or, under `--noflush`, empties it; stale jumps from the built-in
    chains found in `saved` are deleted first, so running twice gives the same table, and the
    whole change applies atomically (one nat-table transaction) or not at all.
    """
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in CHAINS), *stale_jumps(saved), *nat_rules(opts), "COMMIT"]
    return "\n".join(lines) + "\n"
