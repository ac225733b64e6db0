"""`swarmtrain doctor`: will this machine be able to join the swarm? One table of ok/fix lines.

Every check runs even when an earlier one failed (except those that need the swarm), so a
volunteer sees all there is to fix at once. Exit code 0 when everything is ok, 1 otherwise.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import click

from swarmtrain.cli.logs import adopt_library_logs, quiet_interpreter_teardown
from swarmtrain.errors import UserError
from swarmtrain.units import format_bytes

MIN_PYTHON = (3, 11)
CLOCK_TOLERANCE_SECONDS = 1.0  # hivemind matchmaking deadlines are absolute DHT times a few seconds ahead
MEMORY_MARGIN = 0.7  # above this share of free memory, activations and the OS will likely not fit

OK, FIX, WARN, SKIP = "ok", "fix", "warn", "skip"


@dataclass
class Row:
    check: str
    status: str  # ok / fix / warn / skip; only "fix" makes the exit code 1
    detail: str
    fix: str = ""


# ---------------------------------------------------------------------------------------------
# checks on this machine
# ---------------------------------------------------------------------------------------------


def check_python() -> Row:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Row("python", FIX, f"Python {version}", f"install Python {'.'.join(map(str, MIN_PYTHON))} or newer")
    return Row("python", OK, f"Python {version} ({sys.platform})")


def check_torch() -> Row:
    try:
        import torch
    except Exception as error:
        return Row("torch", FIX, f"cannot import torch: {_one_line(error)}", "pip install 'torch>=2.2,<2.15'")
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return Row("torch", OK, f"torch {torch.__version__} ({build})")


def check_device(device: str) -> Tuple[Row, Optional[str]]:
    """The device row and the resolved device ('cpu', 'cuda:0'), or None when it is unusable."""
    try:
        import torch
    except Exception:
        return Row("device", SKIP, "needs torch"), None
    if device == "auto":
        if torch.cuda.is_available():
            return Row("device", OK, f"auto: cuda:0 ({torch.cuda.get_device_name(0)})"), "cuda:0"
        return Row("device", OK, "auto: no CUDA GPU here, training runs on the CPU (slower, still counts)"), "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return Row("device", FIX, f"--device {device} is not a device name", "use --device auto, cpu or cuda:N"), None
    if parsed.type == "cpu":
        return Row("device", OK, "cpu"), "cpu"
    if parsed.type != "cuda":
        return Row("device", FIX, f"--device {device}: swarmtrain trains on cpu or cuda",
                   "use --device auto, cpu or cuda:N"), None
    if not torch.cuda.is_available():
        why = ("torch is a CPU-only build" if not torch.version.cuda
               else f"torch has CUDA {torch.version.cuda} but sees no GPU (driver missing or CUDA_VISIBLE_DEVICES empty)")
        return Row("device", FIX, f"--device {device}: CUDA is not available: {why}",
                   "use --device cpu, or install a CUDA build of torch and the NVIDIA driver"), None
    index = parsed.index or 0
    count = torch.cuda.device_count()
    if index >= count:
        return Row("device", FIX, f"--device {device}: only {count} CUDA device(s) here",
                   f"use --device cuda:0 ... cuda:{count - 1}"), None
    return Row("device", OK, f"cuda:{index} ({torch.cuda.get_device_name(index)})"), f"cuda:{index}"


def check_bitsandbytes(required: bool) -> Row:
    """bitsandbytes provides LAMB and the 8-bit optimizers; AdamW runs without it."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import bitsandbytes
        return Row("bitsandbytes", OK, f"bitsandbytes {bitsandbytes.__version__}")
    except Exception as error:
        status = FIX if required else WARN
        return Row("bitsandbytes", status, f"cannot import bitsandbytes: {_one_line(error)}"
                   + ("" if required else " (this run's optimizer does not need it)"),
                   "pip install 'bitsandbytes>=0.45,<0.51'")


def free_host_memory() -> Optional[int]:
    """Bytes of RAM available to a new process: psutil when installed, else Linux /proc/meminfo."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(config, device: Optional[str], data_path: Optional[str] = None) -> Row:
    if config is None:
        return Row("memory", SKIP, "needs the run config")
    if config.model is None:  # a split run (privacy.split): its digits models are well under 1 MB
        return Row("memory", OK, "a split run: its small models need no more than a few MB")
    from swarmtrain.cli.memory_estimate import estimate_peer_memory  # torch and the model: only here

    device = device or "cpu"
    need = estimate_peer_memory(config, device, data_path)
    eight_bit = config.optimizer.eight_bit
    problems, parts = [], []
    host_free = free_host_memory()
    breakdown = (f"runtime {format_bytes(need.runtime)}, model and optimizer {format_bytes(need.model_and_optimizer)}"
                 + (f", one step of {need.batch_size} samples {format_bytes(need.activations)}" if device == "cpu" else "")
                 + (f", data loader {format_bytes(need.corpus)}" if need.corpus else ""))
    if host_free is None:
        return Row("memory", WARN, f"RAM {format_bytes(need.host_bytes)} needed ({breakdown}); could not measure free "
                   "memory here (pip install psutil)")
    parts.append(f"RAM {format_bytes(need.host_bytes)} of {format_bytes(host_free)} free")
    if need.host_bytes > host_free:
        problems.append("RAM")
    tight = need.host_bytes > MEMORY_MARGIN * host_free
    if need.device_bytes:
        import torch

        gpu_free, _ = torch.cuda.mem_get_info(torch.device(device))
        parts.append(f"{device} {format_bytes(need.device_bytes)} of {format_bytes(gpu_free)} free at one sample per "
                     "step (--batch-size auto fills the rest)")
        if need.device_bytes > gpu_free:
            problems.append("GPU memory")
        tight = tight or need.device_bytes > MEMORY_MARGIN * gpu_free
    detail = (f"{need.num_params / 1e6:.1f}M parameters, {config.optimizer.name}{' 8-bit' if eight_bit else ''}: "
              f"needs {', '.join(parts)} ({breakdown})")
    if problems:
        fix = "free memory (close other programs) or use a bigger machine"
        if device == "cpu":
            fix += "; a smaller --batch-size needs less"
        if not eight_bit:
            fix += "; the organiser can set optimizer.eight_bit: true to cut the optimizer state 4x"
        return Row("memory", FIX, f"not enough {' and '.join(problems)}: {detail}", fix)
    if tight:
        return Row("memory", WARN, detail, "little room left: start with a small --batch-size")
    return Row("memory", OK, detail)


# ---------------------------------------------------------------------------------------------
# checks against the swarm
# ---------------------------------------------------------------------------------------------


async def _ping_each(_dht, node, peer_ids: list, timeout: float) -> list:
    """DHT ping to each peer: did it answer, and its DHT clock against ours (NTP-style midpoint)."""
    import asyncio

    from hivemind.proto import dht_pb2
    from hivemind.utils import get_dht_time

    results = []
    for peer_id in peer_ids:
        sent = get_dht_time()
        try:
            # an empty NodeInfo: answer the ping, but do not add this short-lived node to routing tables
            response = await asyncio.wait_for(
                node.protocol.get_stub(peer_id).rpc_ping(dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(), validate=False)),
                timeout)
            received = get_dht_time()
            results.append(dict(ok=True, rtt=received - sent, offset=response.dht_time - (sent + received) / 2))
        except Exception as error:
            results.append(dict(ok=False, error=_one_line(error) or "no answer"))
    return results


def check_token(token_text: Optional[str], identity: Optional[str],
                initial_peers: List[str]) -> Tuple[Optional[Row], object]:
    """The access token row and the access it gives (None when there is no usable token); no row
    when no token was given (that verdict needs the run config: see token_row_without_token)."""
    if token_text is None:
        return None, None
    from swarmtrain.access.authorizer import volunteer_access
    from swarmtrain.access.tokens import TokenError, format_time

    try:
        access, _ = volunteer_access(token_text, identity, initial_peers)
    except TokenError as error:
        text = str(error)
        if "expired" in text:
            fix = "ask the organiser for a new token"
        elif "issued for peer" in text:
            fix = ("pass --identity with the key file whose peer ID you gave the organiser "
                   "(`swarmtrain identity --identity FILE` prints it)")
        elif "issued by" in text:
            fix = "pass --initial-peers with the coordinator address that came with the token"
        else:
            fix = "copy the whole token again, or ask the organiser for a new one"
        return Row("access token", FIX, text, fix), None
    import time

    token = access.token
    left = token.expires - time.time()
    detail = (f"valid: issued to {token.name} (peer {token.peer_id}) by {token.authority_id}, "
              f"until {format_time(token.expires)}")
    if left < 24 * 3600:
        return Row("access token", WARN, detail + f" (in {left / 3600:.1f} h)",
                   "ask the organiser for a longer one soon"), access
    return Row("access token", OK, detail), access


def token_row_without_token(config) -> Row:
    if config is None:
        return Row("access token", WARN, "none given; the run config could not be read to tell whether the run "
                   "needs one (a token-gated run does not answer peers without a token)",
                   "if the organiser gave you a token, pass it with --token")
    if config.access.mode == "token":
        return Row("access token", FIX, "this run is token-gated and no token was given",
                   "send the organiser your peer ID (`swarmtrain identity`), then pass the token they give you "
                   "with --token")
    return Row("access token", OK, "not required (the run is open)")


def check_swarm(initial_peers: List[str], host_maddrs: List[str], announce_maddrs: List[str],
                listen_port: Optional[int], config_path: Optional[str], timeout: float,
                access=None, say: Callable[[str], None] = lambda text: None) -> Tuple[List[Row], object]:
    """Rows for: each initial peer, the run config, this peer's reachability, the clock. Returns
    the rows and the run config (None if unknown). With `access` (a checked token) this node's DHT
    requests carry the token, as the peer's would."""
    from swarmtrain.config import load_run_config
    from swarmtrain.net.addresses import peer_id_in
    from swarmtrain.net.dht import make_dht
    from swarmtrain.net.reachability import check_reachability
    from swarmtrain.net.run_config import fetch_run_config

    rows: List[Row] = []
    config, config_row = None, None
    if config_path:
        try:
            config = load_run_config(config_path)
            config_row = Row("run config", OK, f"run {config.run_id!r} from {config_path}")
        except UserError as error:
            config_row = Row("run config", FIX, error.message, "fix the file, or leave out --config to use the swarm's")
    if not initial_peers:
        rows.append(Row("initial peers", FIX, "none given",
                        "pass --initial-peers with the address from the coordinator's join command"))
        rows.append(config_row or Row("run config", SKIP, "needs an initial peer (or --config)"))
        rows += [Row(name, SKIP, "needs an initial peer") for name in ("this peer reachable", "clock")]
        return rows, config
    from hivemind.dht.crypto import RSASignatureValidator

    say(f"joining the swarm's DHT through {len(initial_peers)} initial peer(s) (up to {timeout:.0f} s)")
    try:
        # the run config is a signed record: without the validator hivemind cannot even read it
        dht = make_dht(initial_peers=initial_peers, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs,
                       client_mode=False, signature_validator=RSASignatureValidator(), startup_timeout=timeout,
                       access=access)
    except UserError as error:
        if error.message.startswith("could not reach any initial peer"):
            for maddr in initial_peers:
                rows.append(Row(f"initial peer {maddr}", FIX, error.message,
                                "check the address (copy the coordinator's join command) and that the coordinator runs"))
        elif error.message.startswith("the initial peer(s)"):  # they answered, but refused us into the DHT
            for maddr in initial_peers:
                rows.append(Row(f"initial peer {maddr}", FIX, error.message,
                                "see the access token row" if access is not None else
                                "a token-gated run answers only peers with a token: pass --token"))
        else:  # our own side: a port in use, a bad announce address, the daemon did not start
            rows.append(Row("network", FIX, error.message, "change the flag it names"))
        rows.append(config_row or Row("run config", SKIP, "needs a reachable initial peer (or --config)"))
        rows += [Row(name, SKIP, "needs a reachable initial peer") for name in ("this peer reachable", "clock")]
        return rows, config
    try:
        config, config_row = _rows_through_the_swarm(dht, rows, initial_peers, config, config_row, listen_port,
                                                     timeout, access, say)
    finally:
        dht.shutdown()
    return rows, config


def _rows_through_the_swarm(dht, rows: List[Row], initial_peers: List[str], config, config_row: Optional[Row],
                            listen_port: Optional[int], timeout: float, access, say) -> Tuple[object, Row]:
    """check_swarm's rows once this machine's DHT node is up (appended to `rows`)."""
    from swarmtrain.net.addresses import peer_id_in
    from swarmtrain.net.reachability import check_reachability
    from swarmtrain.net.run_config import fetch_run_config

    say("pinging the initial peers and comparing clocks")
    pings = dht.run_coroutine(partial(_ping_each, peer_ids=[peer_id_in(m) for m in initial_peers], timeout=timeout))
    for maddr, ping in zip(initial_peers, pings):
        if ping["ok"]:
            rows.append(Row(f"initial peer {maddr}", OK, f"answers in {ping['rtt'] * 1000:.0f} ms"))
        else:
            rows.append(Row(f"initial peer {maddr}", FIX, f"does not answer: {ping['error']}",
                            "check the address (copy the coordinator's join command) and that it runs"
                            + ("" if access is not None else "; a token-gated run answers only peers with --token")))
    if config_row is None:
        say("reading the run config the coordinator published")
        try:
            published = fetch_run_config(dht, trusted=[peer_id_in(m) for m in initial_peers], timeout=timeout,
                                         has_token=access is not None)
            config = published.config
            config_row = Row("run config", OK, f"run {config.run_id!r} published by {published.owner}")
        except UserError as error:
            config_row = Row("run config", FIX, error.message, "")
    rows.append(config_row)
    say(f"asking the swarm to dial this machine back (up to {timeout:.0f} s)")
    reachability = check_reachability(dht, timeout, initial_peers=initial_peers, listen_port=listen_port)
    if reachability.reachable and reachability.checked_by == "this machine":
        rows.append(Row("this peer reachable", WARN, reachability.detail,
                        "nothing to do now; a swarm with a newer coordinator checks from outside"))
    elif reachability.reachable:
        rows.append(Row("this peer reachable", OK, reachability.detail))
    else:
        rows.append(Row("this peer reachable", FIX,
                        reachability.detail + "; `swarmtrain peer` would train as a client", reachability.suggestion))
    rows.append(_clock_row(pings))
    return config, config_row


def _clock_row(pings: Sequence[dict]) -> Row:
    answered = [p for p in pings if p["ok"]]
    if not answered:
        return Row("clock", SKIP, "no peer answered to compare clocks with")
    best = min(answered, key=lambda p: p["rtt"])  # the shortest round trip bounds the error best
    offset, error = best["offset"], best["rtt"] / 2
    detail = f"offset {offset:+.3f} s (± {error:.3f} s) against the swarm"
    if abs(offset) - error > CLOCK_TOLERANCE_SECONDS:
        return Row("clock", FIX, detail + f"; more than {CLOCK_TOLERANCE_SECONDS:.0f} s breaks averaging deadlines",
                   "turn on time sync: `sudo timedatectl set-ntp true` (Linux), or sync the clock in the OS settings")
    return Row("clock", OK, detail)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def run_checks(initial_peers: List[str], device: str, config_path: Optional[str], host_maddrs: List[str],
               announce_maddrs: List[str], listen_port: Optional[int], timeout: float,
               token: Optional[str] = None, identity: Optional[str] = None, data_path: Optional[str] = None,
               say: Callable[[str], None] = lambda text: None) -> List[Row]:
    """Every check, in order; `say` hears what is being checked before each step (some take seconds)."""
    say("checking Python, torch and the device")
    rows = [_guarded("python", check_python), _guarded("torch", check_torch)]
    device_row, resolved = _guarded_pair("device", lambda: check_device(device))
    rows.append(device_row)
    if token is not None:
        say("checking the access token")
    token_row, access = _guarded_pair("access token", lambda: check_token(token, identity, initial_peers))
    try:
        swarm_rows, config = check_swarm(initial_peers, host_maddrs, announce_maddrs, listen_port, config_path, timeout,
                                         access=access, say=say)
    except Exception as error:  # an unexpected failure becomes a row, not a traceback
        swarm_rows, config = [Row("swarm", FIX, f"check failed: {_one_line(error)}")], None
    needs_bnb = config is None or config.optimizer.name == "lamb" or config.optimizer.eight_bit
    say("checking bitsandbytes")
    rows.append(_guarded("bitsandbytes", lambda: check_bitsandbytes(needs_bnb)))
    if config is not None and config.model is not None:
        say("measuring the memory one training step of this run's model takes")
    rows.append(_guarded("memory", lambda: check_memory(config, resolved, data_path)))
    rows += swarm_rows
    rows.append(token_row or token_row_without_token(config))
    return rows


def _guarded(name: str, check) -> Row:
    try:
        return check()
    except Exception as error:
        return Row(name, FIX, f"check failed: {_one_line(error)}")


def _guarded_pair(name: str, check):
    try:
        return check()
    except Exception as error:
        return Row(name, FIX, f"check failed: {_one_line(error)}"), None


def print_table(rows: List[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="swarmtrain doctor")
    for column in ("check", "result", "detail", "fix"):
        table.add_column(column, overflow="fold")
    colours = {OK: "green", FIX: "bold red", WARN: "yellow", SKIP: "dim"}
    for row in rows:  # (the JSON keeps whole addresses; the table shortens peer IDs to stay readable)
        table.add_row(_short_check(row.check), f"[{colours[row.status]}]{row.status}[/]", row.detail, row.fix)
    console.print(table)
    fixes = sum(row.status == FIX for row in rows)
    console.print("[green]all ok[/]: `swarmtrain peer` with the same flags should join" if not fixes
                  else f"[red]{fixes} thing(s) to fix[/] before joining (see the fix column)")


@click.command("doctor")
@click.option("--initial-peers", multiple=True,
              help="The coordinator's address from its join command (multiaddr with /p2p/...); repeat the flag "
                   "or separate with spaces.")
@click.option("--device", default="auto", show_default=True, help="The device you will train on: auto, cpu or cuda:N.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Check against this local run config instead of the one the swarm publishes.")
@click.option("--announce-maddrs", multiple=True,
              help="Public addresses you will announce (multiaddrs, e.g. /ip4/203.0.113.5/tcp/31337).")
@click.option("--public-ip", default=None,
              help="Your public IP (your router forwards --port to this machine); needs --port.")
@click.option("--port", type=int, default=None, help="The TCP port you will listen on (default: a random one).")
@click.option("--timeout", type=click.FloatRange(min=1), default=15.0, show_default=True,
              help="Seconds to wait for each network check.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--token", default=None, help="Your access token for a token-gated run: checked, then used to reach the swarm.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="Read the access token from this file instead of --token.")
@click.option("--identity", type=click.Path(dir_okay=False), default=None,
              help="The identity file you will join with (the token is bound to its peer ID). "
                   "Default with a token: ~/.swarmtrain/peer.id.")
@click.option("--data", "data_path", type=click.Path(exists=True), default=None,
              help="The --data you will train on (its size counts toward the memory needed). Default: the "
                   "run's own source.")
def doctor(initial_peers, device, config_path, announce_maddrs, public_ip, port, timeout, as_json, token, token_file,
           identity, data_path):
    """Check that this machine can join the swarm: software, memory, network, clock.

    Says on stderr what it is checking as it goes (the network checks take up to --timeout seconds
    each), then prints one line per check with what to fix; exits 0 when all are ok, 1 otherwise.
    """
    from swarmtrain.access.tokens import token_from_options
    from swarmtrain.net.addresses import host_and_announce_maddrs, parse_initial_peers, split_values

    peers = parse_initial_peers(initial_peers)  # malformed addresses: one line, exit 1
    try:
        host_maddrs, announce = host_and_announce_maddrs(port, public_ip, announce_maddrs=split_values(announce_maddrs))
    except ValueError as error:
        raise UserError(str(error)) from None

    token = token_from_options(token, token_file)
    adopt_library_logs(default_level="ERROR")  # a diagnostic adds no hivemind chatter of its own
    try:
        rows = run_checks(peers, device, config_path, host_maddrs, announce, port, timeout, token, identity,
                          data_path, say=lambda text: click.echo(f"doctor: {text}…", err=True))
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130)
    if as_json:
        click.echo(json.dumps([asdict(row) for row in rows], indent=1))
    else:
        print_table(rows)
    quiet_interpreter_teardown()
    raise click.exceptions.Exit(1 if any(row.status == FIX for row in rows) else 0)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _short_check(check: str) -> str:
    return f"initial peer {_short_maddr(check.removeprefix('initial peer '))}" if check.startswith("initial peer ") \
        else check


def _short_maddr(maddr: str) -> str:
    address, _, peer_id = maddr.partition("/p2p/")
    return f"{address}/p2p/{peer_id[:8]}…" if peer_id else address
