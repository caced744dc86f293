"""`meshctl redirect`: the injected init container's command, capturing the pod's traffic.

The command line the injector puts in the init container (`args` after the image's meshctl):

    meshctl redirect [--include-outbound-ip-ranges CIDRS|*] [--exclude-outbound-ip-ranges CIDRS]
                     [--include-inbound-ports PORTS|*] [--exclude-inbound-ports PORTS]
                     [--include-outbound-ports PORTS] [--exclude-outbound-ports PORTS]
                     [--proxy-uid 1337] [--proxy-gid 1337] [--outbound-port 15001] [--inbound-port 15006]
                     [--dry-run]

(`python -m injector.redirect_cmd [same flags]` runs the same command without the meshctl entry point.)
Each `--*-ranges` / `--*-ports` flag takes the value of the pod annotation
`traffic.sidecar.istio.io/<includeOutboundIPRanges|excludeOutboundIPRanges|includeInboundPorts|
excludeInboundPorts|includeOutboundPorts|excludeOutboundPorts>` verbatim (comma-separated);
`injector.redirect.command_args(injector.redirect.options_from_annotations(annotations))` builds
exactly these flags (validated, defaults omitted), so the injector needs no knowledge of them.
With no flags the defaults are Istio's: capture all outbound (`*`) and all inbound ports (`*`)
except 15090, 15021, 15020 (and the tunnel port 15008), the proxy's UID/GID 1337 never captured.

The container must run as root with capabilities NET_ADMIN and NET_RAW (iptables), like Istio's
`istio-init`; it exits 0 once the rules are in place. It runs `iptables-save -t nat` and then
`iptables-restore --noflush` in the pod's network namespace (whatever backend `iptables-restore`
is: nf_tables or legacy); re-running it replaces the rules instead of adding a second copy.
`--dry-run` prints the `iptables-restore` input and changes nothing (no root needed).
Exit status 2 and one line naming the annotation and value for a bad option; 1 if iptables fails.
"""

from __future__ import annotations

import shutil
import subprocess

import click

from injector.redirect import (
    ANNOTATIONS,
    INBOUND_CAPTURE_PORT,
    OUTBOUND_CAPTURE_PORT,
    PROXY_GID,
    PROXY_UID,
    RedirectConfigError,
    parse_options,
    restore_text,
)

IPTABLES_TIMEOUT_S = 30.0


def _run(argv: list[str], stdin: str | None = None) -> str:
    """Run an iptables tool; its failure becomes one ClickException line with its stderr."""
    if shutil.which(argv[0]) is None:
        raise click.ClickException(f"{argv[0]} not found: the init container needs iptables installed")
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def apply_rules(text: str) -> None:
    """Install a restore text produced by `restore_text` (one nat-table transaction)."""
    _run(["iptables-restore", "--noflush"], stdin=text)


def _option_flags(func: click.decorators.FC) -> click.decorators.FC:
    for key, (flag, default) in reversed(list(ANNOTATIONS.items())):
        func = click.option(flag, key, default=default, show_default=True,
                            help=f"Value of the pod annotation {key} (traffic.sidecar.istio.io).")(func)
    return func


@click.command("redirect", epilog="""
\b
Examples:
  meshctl redirect                                  # the init container: capture all TCP (needs NET_ADMIN)
  meshctl redirect --dry-run                        # the iptables-restore input, changing nothing
  meshctl redirect --exclude-inbound-ports 15020,9090 --proxy-uid 1337 --dry-run

\b
Exit codes: 0 redirected (or printed); 1 iptables is missing or refused the rules (its message is
printed); 2 bad usage, e.g. an annotation value that is no port list or CIDR.
""")
@_option_flags
@click.option("--proxy-uid", type=click.IntRange(0), default=PROXY_UID, show_default=True,
              help="UID whose traffic is never captured.")
@click.option("--proxy-gid", type=click.IntRange(0), default=PROXY_GID, show_default=True,
              help="GID whose traffic is never captured.")
@click.option("--outbound-port", type=click.IntRange(1, 65535), default=OUTBOUND_CAPTURE_PORT, show_default=True,
              help="Envoy's outbound capture listener.")
@click.option("--inbound-port", type=click.IntRange(1, 65535), default=INBOUND_CAPTURE_PORT, show_default=True,
              help="Envoy's inbound capture listener.")
@click.option("--dry-run", is_flag=True, help="Print the iptables-restore input; change nothing.")
def redirect(proxy_uid: int, proxy_gid: int, outbound_port: int, inbound_port: int, dry_run: bool,
             **values: str) -> None:
    """Redirect the pod's TCP traffic to the sidecar (15001 outbound, 15006 inbound) with iptables."""
    try:
        opts = parse_options(values, proxy_uid=proxy_uid, proxy_gid=proxy_gid, outbound_port=outbound_port,
                             inbound_port=inbound_port)
    except RedirectConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if dry_run:
        click.echo(restore_text(opts), nl=False)
        return
    saved = _run(["iptables-save", "-t", "nat"])
    apply_rules(restore_text(opts, saved))
    click.echo(f"traffic redirected: outbound -> {outbound_port}, inbound -> {inbound_port} "
               f"(UID {proxy_uid} / GID {proxy_gid} exempt)")


if __name__ == "__main__":
    redirect()
