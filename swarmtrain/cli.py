"""The `swarmtrain` command."""
from __future__ import annotations

import logging
import os
import sys
import warnings

# hivemind reads its log level at import time; its INFO chatter is for hivemind developers
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")

import click

from swarmtrain import __version__
from swarmtrain.errors import UserError

MULTIADDR_HELP = "multiaddr(s), e.g. /ip4/0.0.0.0/tcp/31337; repeat the flag or separate with spaces"


class _BatchSizeType(click.ParamType):
    """A positive integer, or auto (None: sized to memory)."""
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or value == "auto":
            return None
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1:
            self.fail(f"{value!r} is neither a positive number of samples nor 'auto'", param, ctx)
        return number


class _MemorySizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        from swarmtrain.peer.resources import parse_memory_size

        if isinstance(value, int):
            return value
        try:
            return parse_memory_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


BATCH_SIZE, MEMORY_SIZE = _BatchSizeType(), _MemorySizeType()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("asyncio").addFilter(_DropHivemindCancelledStepNoise())
    _ignore_orphaned_step_controls()
    from hivemind.utils.logging import get_logger as get_hivemind_logger

    for name in ("hivemind.averaging.averager", "hivemind.optim.optimizer", "hivemind.dht.dht"):
        get_hivemind_logger(name).addFilter(_OneLineForExpectedRoundFailures())
    for noisy in ("bitsandbytes", "transformers", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    # hivemind steps a freshly loaded LR scheduler up to the swarm's epoch; torch warns about the order
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
    if verbose:
        from hivemind.utils.logging import get_logger

        get_logger("hivemind").setLevel(logging.INFO)


class _DropHivemindCancelledStepNoise(logging.Filter):
    """hivemind's averager sets the result of a pre-scheduled round that the optimizer already
    cancelled (it does so when it finds itself alone); asyncio then logs the InvalidStateError of
    that orphaned task with a traceback, although nothing went wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and record.args and isinstance(record.args, dict):
            exc = record.args.get("exception")
        message = record.getMessage()
        return not ("Task exception was never retrieved" in message and "CANCELLED" in repr(exc) + message)


class _OneLineForExpectedRoundFailures(logging.Filter):
    """In a volunteer swarm a round fails whenever a groupmate leaves or never shows up; hivemind
    logs each with a full traceback at ERROR. Keep the line (as a warning), drop the traceback;
    unexpected errors keep theirs."""

    EXPECTED = ("AllreduceException", "MatchmakingException", "TimeoutError", "CancelledError", "BannedException",
                "RejectedPart")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _request_from_an_exited_process(record, exc):
            # a DHT request sent by a process that exited before the DHT read it (an averager shut
            # down mid-matchmaking): nobody waits for its answer
            record.msg, record.args, record.exc_info, record.exc_text = (
                "dropped a DHT request from a process that has already exited", None, None, None)
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        if exc is not None and type(exc).__name__ in self.EXPECTED:
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _request_from_an_exited_process(record: logging.LogRecord, exc: BaseException) -> bool:
    """hivemind's DHT process unpickling a request whose reply pipe belongs to a process that is gone
    (the error comes straight from ``rebuild_connection``, or as swarmtrain.network._RequestPipe's)."""
    from swarmtrain.network import raised_in

    if not record.name.startswith("hivemind.dht") or not isinstance(exc, (FileNotFoundError, ConnectionError)):
        return False
    return raised_in(exc, "rebuild_connection")


def _ignore_orphaned_step_controls() -> None:
    """A stop signal that lands while hivemind creates a StepControl leaves one without a trigger;
    its __del__ then asserts and Python prints the traceback as an 'Exception ignored'. Nothing is
    lost (the round it belonged to is abandoned anyway): drop exactly that one."""
    default_hook = sys.unraisablehook

    def hook(unraisable):
        origin = getattr(unraisable.object, "__qualname__", "")
        if origin == "StepControl.__del__" and isinstance(unraisable.exc_value, AssertionError):
            return
        default_hook(unraisable)

    sys.unraisablehook = hook


def _quiet_interpreter_teardown() -> None:
    """Called once hivemind's processes are shut down. Its leftover MPFutures and asyncio tasks
    are finalised after their event loops closed and would print 'Event loop is closed' and
    'Task was destroyed' noise at exit; by then there is nothing left that such a message
    could be about."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None


def _split(values) -> list:
    return [item for value in values for item in value.replace(",", " ").split()]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="swarmtrain")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details, including hivemind's own messages.")
def main(verbose: bool) -> None:
    """Train a model together with volunteers over a hivemind swarm.

    \b
    Volunteer:  swarmtrain peer --initial-peers /ip4/.../tcp/31337/p2p/Qm...
    Organiser:  swarmtrain coordinator --config run.yaml
    Try it:     swarmtrain demo --peers 3
    """
    _setup_logging(verbose)


@main.group(invoke_without_command=True)
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
@click.pass_context
def coordinator(ctx, config_path, identity, host_maddrs, announce_maddrs, log_every, metrics_host, metrics_port,
                per_peer_metrics, checkpoint_dir, checkpoint_every, keep_checkpoints, resume_from):
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
    from swarmtrain.identity import default_identity_path
    from swarmtrain.signals import StopRequested, children_die_with_this_process, raise_on_stop_signals

    children_die_with_this_process()
    config = load_run_config(config_path)
    identity = identity or str(default_identity_path(f"coordinator-{config.run_id}"))
    token_gated = config.access.mode == "token"
    if token_gated:
        from swarmtrain.access import activate, coordinator_access
        from swarmtrain.identity import load_or_create_identity

        # the coordinator is the authority: its DHT and its checks accept the tokens its key signed
        activate(coordinator_access(load_or_create_identity(identity)))
    raise_on_stop_signals()
    node = None
    try:
        node = Coordinator(config, identity=identity, host_maddrs=_split(host_maddrs),
                           announce_maddrs=_split(announce_maddrs), metrics_host=metrics_host,
                           metrics_port=metrics_port or None, per_peer_metrics=per_peer_metrics,
                           checkpoint_dir=checkpoint_dir,
                           checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                           resume_from=resume_from)
        node.publish()
        maddrs = _split(announce_maddrs) or node.maddrs
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
    except StopRequested:
        logging.getLogger("swarmtrain.coordinator").info("stopping; peers keep training")
    finally:
        if node is not None:
            node.shutdown()
        _quiet_interpreter_teardown()


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

    from swarmtrain.access import TokenError, format_time, issue_token, parse_expiry
    from swarmtrain.identity import load_or_create_identity, peer_id_of
    from swarmtrain.network import parse_initial_peers, peer_id_in

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


@main.command("identity")
@click.option("--identity", type=click.Path(dir_okay=False), default=None,
              help="Private key file of this peer (created if missing). Default: ~/.swarmtrain/peer.id, the one "
                   "`swarmtrain peer --token` uses when --identity is not given.")
def identity_command(identity):
    """Print this peer's ID, creating its identity file if missing.

    A token-gated run's organiser needs it to issue you an access token; prints the peer ID alone
    on stdout.
    """
    from swarmtrain.identity import default_identity_path, load_or_create_identity, peer_id_of

    path = identity or str(default_identity_path("peer"))
    click.echo(str(peer_id_of(load_or_create_identity(path).get_public_key())))
    click.echo(f"(the peer ID of {path}; send it to the organiser to get an access token)", err=True)


def _activate_peer_token(token: str | None, token_file: str | None, identity: str | None, initial_peers) -> str | None:
    """Check a volunteer's token before joining (one line if it would not let us in) and make it this
    process's access; returns the identity file to use."""
    if token is None and token_file is None:
        return identity
    from swarmtrain.access import token_from_options

    token = token_from_options(token, token_file)
    from swarmtrain.access import TokenError, activate, peer_access
    from swarmtrain.identity import default_identity_path, load_or_create_identity
    from swarmtrain.network import peer_id_in

    identity = identity or str(default_identity_path("peer"))
    try:
        access = peer_access(token, load_or_create_identity(identity), [peer_id_in(m) for m in initial_peers],
                             identity_hint=f" ({identity})")
    except TokenError as error:
        raise UserError(str(error)) from None
    activate(access)
    return identity


@main.command()
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
                   "of text files, or a Hugging Face dataset saved with save_to_disk.")
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
    from swarmtrain.network import parse_initial_peers
    from swarmtrain.peer.trainer import PeerOptions, run_peer
    from swarmtrain.signals import children_die_with_this_process

    from swarmtrain.reachability import host_and_announce_maddrs

    children_die_with_this_process()
    initial_peers = parse_initial_peers(initial_peers)
    identity = _activate_peer_token(token, token_file, identity, initial_peers)
    try:
        hosts, announces = host_and_announce_maddrs(port, public_ip, host_maddrs=_split(host_maddrs),
                                                    announce_maddrs=_split(announce_maddrs))
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
    status = run_peer(options)
    _quiet_interpreter_teardown()
    if status.get("phase") not in ("finished", "stopped"):
        raise UserError("the peer stopped before training started")


@main.command()
@click.option("--peers", type=click.IntRange(min=1, max=8), default=3, show_default=True,
              help="Number of peer processes to start beside the coordinator.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Run config (default: the embedded tiny config, a small code LM on the Python stdlib).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Swarm epochs (optimizer steps) to train.")
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


from swarmtrain.doctor import doctor  # noqa: E402  (after main: the commands are added to it)
from swarmtrain.privacy.cli import audit  # noqa: E402

main.add_command(audit)
main.add_command(doctor)

if __name__ == "__main__":
    main()
