"""`meshctl completion bash|zsh|fish`: the shell script that completes commands, options and proxies.

The script calls meshctl back with `_MESHCTL_COMPLETE` set (click's completion protocol); PROXY
arguments complete from the proxies pilot has connected. Pure text generation, no I/O.
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "fish")
PROG = "meshctl"
ENV_VAR = "_MESHCTL_COMPLETE"

EXAMPLES = """
\b
Examples:
  source <(meshctl completion bash)                       # this bash session
  meshctl completion bash > ~/.local/share/bash-completion/completions/meshctl
  meshctl completion zsh > "${fpath[1]}/_meshctl"          # zsh (after compinit)
  meshctl completion fish > ~/.config/fish/completions/meshctl.fish
"""


def completion_script(root: click.Command, shell: str) -> str:
    """The completion script of `root` (installed as `meshctl`) for `shell`."""
    cls = get_completion_class(shell)
    if cls is None:
        raise click.BadParameter(f"no completion for shell {shell!r}; one of {', '.join(SHELLS)}", param_hint="SHELL")
    return cls(root, {}, PROG, ENV_VAR).source()


@click.command("completion", epilog=EXAMPLES)
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for bash, zsh or fish."""
    click.echo(completion_script(ctx.find_root().command, shell))
