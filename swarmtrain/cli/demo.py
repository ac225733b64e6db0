"""`swarmtrain demo`: a whole swarm on this machine."""
from __future__ import annotations

import sys

import click


@click.command()
@click.option("--peers", type=click.IntRange(min=1, max=8), default=3, show_default=True,
              help="Number of peer processes to start beside the coordinator.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Run config (default: the embedded demo config, a small code LM on the Python stdlib, "
                   "trained in local mode with sparse rounds that overlap the computation).")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Swarm epochs to train (an epoch: the config's target_batch_size samples over the swarm; "
                   "the demo config averages once an epoch).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Samples per local step on each peer.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where logs, status files and checkpoints go (default: a new temporary directory).")
def demo(peers, config_path, epochs, batch_size, workdir):
    """Run a whole swarm on this machine: a coordinator and N peers on 127.0.0.1.

    Shows a live table of the peers and ends with a summary (epochs, averaging rounds, held-out
    loss before and after, wall time).
    """
    from swarmtrain.demo import run_demo

    code = run_demo(num_peers=peers, config_path=config_path, epochs=epochs, batch_size=batch_size, workdir=workdir)
    sys.exit(code)
