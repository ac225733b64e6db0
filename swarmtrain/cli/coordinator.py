"""`swarmtrain coordinator` and `swarmtrain coordinator issue-token`."""
from __future__ import annotations

import logging
import sys

import click

from swarmtrain.cli.logs import adopt_library_logs, quiet_interpreter_teardown
from swarmtrain.cli.options import MULTIADDR_HELP
from swarmtrain.errors import UserError


@click.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="The run's YAML config (see configs/ for examples); published to peers through the DHT. "
                   "Required to run the coordinator.")
@click.option("--identity", type=click.Path(dir_okay=False), default=None,
              help="Private key file that fixes this node's peer ID, so its multiaddr survives restarts; "
                   "created if missing. Default: ~/.swarmtrain/coordinator-<run_id>.id")
@click.option("--host-maddrs", multiple=True, default=["/ip4/0.0.0.0/tcp/31337"], show_default=True,
              help="Addresses to listen on: " + MULTIADDR_HELP)
@click.option("--announce-maddrs", multiple=True,
              help="Public addresses to tell peers about, when they differ from the listen addresses "
                   "(e.g. behind port forwarding): " + MULTIADDR_HELP)
@click.option("--log-every", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds between swarm progress lines.")
@click.option("--metrics-host", default="0.0.0.0", show_default=True,
              help="Interface for the Prometheus /metrics and JSON /status endpoints.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=9400, show_default=True,
              help="Port for /metrics and /status (0: off).")
@click.option("--per-peer-metrics", is_flag=True,
              help="Also export one series per peer (the dashboard's per-peer table); off by default "
                   "because it grows with the swarm.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Periodically download the state from peers and save it here (safetensors, atomic), "
                   "so the run survives every peer leaving. Default: off.")
@click.option("--checkpoint-every", type=click.FloatRange(min=5), default=600.0, show_default=True,
              help="Seconds between coordinator checkpoints.")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the newest checkpoints to keep.")
@click.option("--resume", "resume_from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start the swarm from this checkpoint (a checkpoint directory, or a directory of them: "
                   "the newest is used); the first peers download it from the coordinator.")
@click.option("--revoked", "revoked_file", type=click.Path(dir_okay=False), default=None,
              help="A text file of peers to refuse, one per line: PEER_ID [UNTIL] [# reason], UNTIL being a duration "
                   "counted from the file's last change (12h, 7d; 30d if omitted) or a UTC date (2026-12-31). "
                   "Re-read while the coordinator runs; on a token-gated run every peer refuses to average "
                   "with them until then.")
@click.pass_context
def coordinator(ctx, config_path, identity, host_maddrs, announce_maddrs, log_every, metrics_host, metrics_port,
                per_peer_metrics, checkpoint_dir, checkpoint_every, keep_checkpoints, resume_from, revoked_file):
    """Bootstrap the swarm, publish the run config (signed) and log the swarm's progress.

    Prints the command volunteers paste to join. Stop with Ctrl+C: peers keep training, and a
    restart with the same --identity comes back at the same address. For a token-gated run
    (access.mode: token in the config) give each volunteer a token with
    `swarmtrain coordinator issue-token`.
    """
    if ctx.invoked_subcommand is not None:
        return  # e.g. `swarmtrain coordinator issue-token ...`
    if config_path is None:
        raise click.UsageError("Missing option '--config' (the run's YAML config).")
    from swarmtrain.config import load_run_config
    from swarmtrain.coordinator.coordinator import Coordinator, join_command
    from swarmtrain.net.addresses import split_values
    from swarmtrain.net.identity import default_identity_path
    from swarmtrain.signals import StopRequested, children_die_with_this_process, raise_on_stop_signals

    children_die_with_this_process()
    adopt_library_logs()
    config = load_run_config(config_path)  # every value peers could not run is refused here, before publishing
    if checkpoint_dir:
        from swarmtrain.training.checkpoint import check_checkpoint_dir

        check_checkpoint_dir(checkpoint_dir)
    if revoked_file is not None:
        from swarmtrain.access.bans import read_revocations

        read_revocations(revoked_file)  # a malformed file is a one-line error now, not a warning later
    identity = identity or str(default_identity_path(f"coordinator-{config.run_id}"))
    token_gated = config.access.mode == "token"  # the coordinator is the authority (see Coordinator)
    raise_on_stop_signals()
    node = None
    try:
        node = Coordinator(config, identity=identity, host_maddrs=split_values(host_maddrs),
                           announce_maddrs=split_values(announce_maddrs), metrics_host=metrics_host,
                           metrics_port=metrics_port or None, per_peer_metrics=per_peer_metrics,
                           checkpoint_dir=checkpoint_dir,
                           checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                           resume_from=resume_from, revoked_file=revoked_file)
        node.publish()
        maddrs = split_values(announce_maddrs) or node.maddrs
        command = join_command(maddrs) + (" --token TOKEN" if token_gated else "")
        click.echo(f"Run {config.run_id!r} is published. Volunteers join with:\n\n    {command}\n", err=False)
        if token_gated:
            click.echo("The run is token-gated: a volunteer sends you their peer ID (`swarmtrain identity`) and you "
                       f"give them a TOKEN made with\n\n    swarmtrain coordinator issue-token --identity {identity} "
                       "--name NAME --peer-id PEER_ID --expires 7d\n")
        if node.metrics_server is not None:
            click.echo(f"Metrics: {node.metrics_server.url}/metrics and {node.metrics_server.url}/status")
        sys.stdout.flush()
        node.run(log_every=log_every)
    except StopRequested as stop:
        logging.getLogger("swarmtrain.coordinator").info(f"{stop.args[0]} received: stopping; peers keep training")
    finally:
        try:
            if node is not None:
                node.shutdown()
        except StopRequested:
            pass  # a second stop signal while the DHT shuts down: its process ends with this one
        quiet_interpreter_teardown()


@coordinator.command("issue-token")
@click.option("--identity", required=True, type=click.Path(dir_okay=False),
              help="The coordinator's identity file (its --identity; without one it is "
                   "~/.swarmtrain/coordinator-<run_id>.id): tokens are signed with its key.")
@click.option("--name", required=True,
              help="Who the token is for, shown in logs: 1-64 letters, digits or . _ @ + - (e.g. alice).")
@click.option("--peer-id", required=True,
              help="The volunteer's peer ID (Qm...), which they print with `swarmtrain identity`; only that peer "
                   "can use the token.")
@click.option("--expires", default="7d", show_default=True,
              help="How long the token is valid (90m, 12h, 7d, 4w) or until when (a UTC date such as 2026-12-31).")
@click.option("--initial-peers", multiple=True,
              help="The coordinator's public address, to complete the printed join command: " + MULTIADDR_HELP)
def issue_token_command(identity, name, peer_id, expires, initial_peers):
    """Issue an access token for a token-gated run (access.mode: token).

    Prints the token alone on stdout (for scripts) and, on stderr, what it allows and the command the
    volunteer pastes. A token is bound to the volunteer's peer ID and expires; there is no revocation,
    so prefer short lifetimes and issue new tokens as needed.
    """
    from pathlib import Path

    from swarmtrain.access.tokens import TokenError, format_time, issue_token, parse_expiry
    from swarmtrain.net.addresses import parse_initial_peers, peer_id_in
    from swarmtrain.net.identity import load_or_create_identity, peer_id_of

    if not Path(identity).expanduser().exists():
        raise UserError(f"identity file {identity} does not exist; pass the coordinator's --identity file "
                        "(tokens must be signed by the coordinator's key)")
    key = load_or_create_identity(identity)
    authority = peer_id_of(key.get_public_key())
    maddrs = parse_initial_peers(initial_peers)
    for maddr in maddrs:
        if peer_id_in(maddr) != authority:
            raise UserError(f"--initial-peers {maddr} is not the address of this identity (peer {authority}); "
                            "give the coordinator's own address")
    try:
        token = issue_token(key, name, peer_id, parse_expiry(expires))
    except TokenError as error:
        raise UserError(str(error)) from None
    text = token.to_text()
    click.echo(text)
    where = " ".join(maddrs) or "<the coordinator's address>"
    click.echo(f"\nToken for {token.name} (peer {token.peer_id}), valid until {format_time(token.expires)}, "
               f"signed by the coordinator {authority}. The volunteer joins with:\n\n"
               f"    swarmtrain peer --initial-peers {where} --token {text}\n\n"
               "(add --identity FILE if their peer ID comes from another file than ~/.swarmtrain/peer.id)", err=True)

