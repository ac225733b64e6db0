"""`swarmtrain peer` and `swarmtrain identity`."""
from __future__ import annotations

import click

from swarmtrain.cli.logs import adopt_library_logs, quiet_interpreter_teardown
from swarmtrain.cli.options import BATCH_SIZE, MEMORY_SIZE, MULTIADDR_HELP
from swarmtrain.errors import UserError


@click.command("identity")
@click.option("--identity", type=click.Path(dir_okay=False), default=None,
              help="Private key file of this peer (created if missing). Default: ~/.swarmtrain/peer.id, the one "
                   "`swarmtrain peer --token` uses when --identity is not given.")
def identity_command(identity):
    """Print this peer's ID, creating its identity file if missing.

    A token-gated run's organiser needs it to issue you an access token; prints the peer ID alone
    on stdout.
    """
    from swarmtrain.net.identity import default_identity_path, load_or_create_identity, peer_id_of

    path = identity or str(default_identity_path("peer"))
    click.echo(str(peer_id_of(load_or_create_identity(path).get_public_key())))
    click.echo(f"(the peer ID of {path}; send it to the organiser to get an access token)", err=True)


def peer_access_from_token(token: str | None, token_file: str | None, identity: str | None, initial_peers):
    """A volunteer's access from --token / --token-file, checked before joining (one line if it would
    not let us in), and the identity file to use: (None, identity) without a token."""
    from swarmtrain.access.tokens import token_from_options

    token = token_from_options(token, token_file)
    if token is None:
        return None, identity
    from swarmtrain.access.authorizer import volunteer_access
    from swarmtrain.access.tokens import TokenError

    try:
        return volunteer_access(token, identity, initial_peers)
    except TokenError as error:
        raise UserError(str(error)) from None


@click.command()
@click.option("--initial-peers", multiple=True, required=True,
              help="The coordinator's address (from its join command), or any peer's: " + MULTIADDR_HELP)
@click.option("--run-id", default=None, help="Refuse to train unless the swarm's run has this id.")
@click.option("--device", default="auto", show_default=True,
              help="auto (a GPU when there is one), cpu, or cuda:N.")
@click.option("--batch-size", type=BATCH_SIZE, default="auto", show_default=True,
              help="Samples per local step on this machine, or auto: the largest power of two whose step fits "
                   "the memory (on a GPU 90% of it, or --max-memory; on a CPU 8 unless --max-memory is given). "
                   "The swarm's batch per optimizer step is the run's target_batch_size regardless.")
@click.option("--max-memory", type=MEMORY_SIZE, default=None,
              help="Memory this peer may use for training, e.g. 6GB or 5.5GiB (GPU memory on a GPU, RAM on a "
                   "CPU), model and optimizer included; --batch-size auto sizes the batch to it.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on GPUs that support it (Ampere or newer), fp32 otherwise. Weights, "
                   "gradients and averaging stay fp32 either way.")
@click.option("--data", type=click.Path(exists=True), default=None,
              help="Train on this local data instead of the run's default source: a text file, a directory "
                   "of text files, or a Hugging Face dataset saved with save_to_disk (read as a stream, "
                   "tokenized with the run's tokenizer).")
@click.option("--identity", type=click.Path(dir_okay=False), default=None,
              help="Private key file for a stable peer ID across restarts (created if missing). "
                   "Default: a new ID each start; with --token, ~/.swarmtrain/peer.id.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=None,
              help="Listen on this TCP port on every interface (default: a free port). Fix it when your "
                   "router forwards a port to this machine.")
@click.option("--public-ip", default=None,
              help="Your public IP address, announced to other peers (with --port; your router must forward "
                   "that port here). `swarmtrain doctor` tells you when you need it.")
@click.option("--host-maddrs", multiple=True,
              help="Addresses to listen on, instead of --port (default /ip4/0.0.0.0/tcp/0): " + MULTIADDR_HELP)
@click.option("--announce-maddrs", multiple=True,
              help="Public addresses to tell other peers, instead of --public-ip: " + MULTIADDR_HELP)
@click.option("--client-mode", is_flag=True,
              help="Do not accept incoming connections (behind NAT/firewall): send gradients, reduce nothing.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Save this peer's state here (every --checkpoint-every epochs and on exit); resume from it on restart.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=10, show_default=True,
              help="Epochs between checkpoints (0: only on exit).")
@click.option("--max-epochs", type=click.IntRange(min=1), default=None,
              help="Leave the swarm once it reaches this epoch. Default: train until stopped.")
@click.option("--eval-every", type=click.IntRange(min=0), default=10, show_default=True,
              help="Epochs between held-out loss measurements (0: only at start and end).")
@click.option("--status-file", type=click.Path(dir_okay=False), default=None,
              help="Keep a JSON summary of this peer's progress here (used by dashboards and the demo).")
@click.option("--progress/--no-progress", default=None,
              help="Live progress bar (default: when writing to a terminal) or one log line per epoch.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              help="Serve this peer's own Prometheus /metrics on this port (0.0.0.0). Default: off.")
@click.option("--max-upload-mbps", type=click.FloatRange(min=0.1), default=None,
              help="Your upload speed in Mbit/s (default: assume 100). Averaging gives a peer a share of "
                   "the reduction work in proportion to it, so a slow uplink sends less; your own "
                   "(compressed) gradient still goes out each round.")
@click.option("--token", default=None,
              help="Access token from the organiser, for a token-gated run (bound to your peer ID: "
                   "`swarmtrain identity` prints it).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="Read the access token from this file instead of --token.")
@click.option("--role", type=click.Choice(["trainer", "trunk", "data-owner"]), default="trainer", show_default=True,
              help="On a split run (privacy.split in the run config): trunk hosts the layers after the cut for "
                   "data owners (the default role there); data-owner trains its own layers through a trunk host, "
                   "sending only the cut activations Z and labels.")
@click.option("--data-owner-data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="--role data-owner: an .npz with x [N, 64] and y [N] (default: the embedded sklearn digits).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="--role data-owner: leave after this many steps (default: train until stopped).")
@click.option("--wait-for-peers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Hold the first step until this many peers (this one included) train the run, for at most "
                   "--wait-timeout seconds. For peers started together at the start of a run, so that none "
                   "trains alone first; on a run under way it returns at once.")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=300, show_default=True,
              help="Seconds --wait-for-peers waits before training with the peers that are there.")
def peer(initial_peers, run_id, device, batch_size, max_memory, precision, data, identity, port, public_ip, host_maddrs, announce_maddrs,
         client_mode,
         checkpoint_dir, checkpoint_every, max_epochs, eval_every, status_file, progress, metrics_port,
         max_upload_mbps, token, token_file, role, data_owner_data, max_steps, wait_for_peers, wait_timeout):
    """Join a swarm and train: the run's config and current model come from the swarm.

    Ctrl+C leaves cleanly (state saved when --checkpoint-dir is set).
    """
    from swarmtrain.net.addresses import host_and_announce_maddrs, parse_initial_peers, split_values
    from swarmtrain.peer.options import PeerOptions
    from swarmtrain.peer.run import run_peer
    from swarmtrain.signals import children_die_with_this_process

    children_die_with_this_process()
    adopt_library_logs()
    if checkpoint_dir:  # before joining: an unwritable directory is refused in one line, not at the first save
        from swarmtrain.training.checkpoint import check_checkpoint_dir

        check_checkpoint_dir(checkpoint_dir)
    initial_peers = parse_initial_peers(initial_peers)
    access, identity = peer_access_from_token(token, token_file, identity, initial_peers)
    try:
        hosts, announces = host_and_announce_maddrs(port, public_ip, host_maddrs=split_values(host_maddrs),
                                                    announce_maddrs=split_values(announce_maddrs))
    except ValueError as error:
        raise UserError(str(error)) from None
    options = PeerOptions(
        initial_peers=initial_peers, run_id=run_id, device=device, batch_size=batch_size,
        max_memory=max_memory, precision=precision, data=data, identity=identity, host_maddrs=hosts or ["/ip4/0.0.0.0/tcp/0"], announce_maddrs=announces,
        client_mode=client_mode, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        max_epochs=max_epochs, eval_every=eval_every, status_file=status_file, show_progress=progress,
        metrics_port=metrics_port, port=port, upload_mbps=max_upload_mbps,
        role=role, data_owner_data=data_owner_data, max_steps=max_steps,
        wait_for_peers=wait_for_peers, wait_for_peers_timeout=wait_timeout,
    )
    status = run_peer(options, access=access)
    quiet_interpreter_teardown()
    if status.get("phase") not in ("finished", "stopped"):
        raise UserError("the peer stopped before training started")

