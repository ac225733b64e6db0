"""The `swarmtrain` command."""
from __future__ import annotations

import os

# hivemind reads its log level at import time; its INFO chatter is for hivemind developers
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")

import click

from swarmtrain import __version__
from swarmtrain.cli.logs import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="swarmtrain")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details, including hivemind's own messages.")
def main(verbose: bool) -> None:
    """Train a model together with volunteers over a hivemind swarm.

    \b
    Volunteer:  swarmtrain peer --initial-peers /ip4/.../tcp/31337/p2p/Qm...
    Organiser:  swarmtrain coordinator --config run.yaml
    Try it:     swarmtrain demo --peers 3
    Plan a run: swarmtrain simulate --config run.yaml --peers 8
    """
    setup_logging(verbose)


def _register_commands() -> None:
    from swarmtrain.cli.coordinator import coordinator
    from swarmtrain.cli.demo import demo
    from swarmtrain.cli.doctor import doctor
    from swarmtrain.cli.peer import identity_command, peer
    from swarmtrain.cli.simulate import simulate
    from swarmtrain.cli.tokenizer import tokenizer
    from swarmtrain.privacy.cli import audit

    for command in (coordinator, peer, identity_command, demo, doctor, audit, simulate, tokenizer):
        main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
