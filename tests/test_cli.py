"""What a user sees at the command line: help for every flag, and one clear line for mistakes."""
import click
import pytest

from swarmtrain.cli import main
from tests.support import assert_one_line_error, run_cli


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))


@pytest.mark.parametrize("path,command", list(_commands(main)), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_flag_is_explained(path, command):
    assert command.help and len(command.help) > 20, f"{' '.join(path)} has no description"
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help and len(param.help) > 10, f"{' '.join(path)} {param.opts} has no help"


def test_top_level_help_names_the_user_stories():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("peer", "coordinator", "demo"):
        assert command in result.stdout


def test_invalid_config_is_one_line(tmp_path, tiny_config_text):
    path = tmp_path / "run.yaml"
    path.write_text(tiny_config_text.replace("compression: none", "compression: zip"))
    assert_one_line_error(run_cli("coordinator", "--config", str(path)), "averaging.compression", "gaussiank:RHO")


def test_malformed_config_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_id: [unclosed\n")
    assert_one_line_error(run_cli("coordinator", "--config", str(path)), "not valid YAML")


def test_missing_config_file():
    assert_one_line_error(run_cli("coordinator", "--config", "/nonexistent/run.yaml"), "does not exist")


def test_malformed_initial_peer():
    assert_one_line_error(run_cli("peer", "--initial-peers", "localhost:31337"), "not a multiaddr")


def test_initial_peer_without_peer_id():
    assert_one_line_error(run_cli("peer", "--initial-peers", "/ip4/127.0.0.1/tcp/31337"), "/p2p/")


def test_unreachable_initial_peer():
    # a valid address where nobody listens (port 9 is discard; nothing runs there on loopback)
    maddr = "/ip4/127.0.0.1/tcp/9/p2p/QmZ91vG83M6qeh2SkS1B9VoF2qVKbgEgDxPBx9vCjK4tKn"
    assert_one_line_error(run_cli("peer", "--initial-peers", maddr, "--device", "cpu"), "could not reach any initial peer")


def test_cuda_on_a_machine_without_it():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    maddr = "/ip4/127.0.0.1/tcp/9/p2p/QmZ91vG83M6qeh2SkS1B9VoF2qVKbgEgDxPBx9vCjK4tKn"
    assert_one_line_error(run_cli("peer", "--initial-peers", maddr, "--device", "cuda"), "no CUDA")


def test_bad_flag_value():
    result = run_cli("demo", "--peers", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--peers" in result.stderr


def test_a_dht_request_from_an_exited_process_is_not_a_traceback():
    """hivemind's DHT process logs, with a traceback, a request whose reply pipe belongs to a process
    that exited meanwhile (an averager stopped mid-matchmaking): at shutdown that is expected."""
    import logging
    import sys

    from swarmtrain.cli.logs import OneLineForExpectedRoundFailures

    def rebuild_connection():
        raise FileNotFoundError(2, "No such file or directory")

    def record_of(raiser, name="hivemind.dht.dht"):
        try:
            raiser()
        except Exception:
            return logging.LogRecord(name, logging.ERROR, __file__, 1, "[Errno 2] No such file or directory",
                                     None, sys.exc_info(), func="_run")

    record = record_of(rebuild_connection)
    OneLineForExpectedRoundFailures().filter(record)
    assert record.exc_info is None and record.levelno == logging.DEBUG and "exited" in record.getMessage()

    def open_a_file():  # the same error from anywhere else keeps its traceback
        raise FileNotFoundError(2, "No such file or directory")

    other = record_of(open_a_file)
    assert OneLineForExpectedRoundFailures().filter(other) and other.exc_info is not None
    assert other.levelno == logging.ERROR


def test_a_helper_connection_reset_after_a_stop_signal_is_no_traceback(monkeypatch):
    """systemd's SIGTERM goes to the whole process group: the helper processes end with the peer, and
    multiprocessing's resource-sharer thread reported one reset connection through sys.excepthook, a
    traceback in a clean exit (seen in test_shutdown). After a stop signal such an error is one debug
    line; before one, or any other error, is printed as always."""
    import multiprocessing.resource_sharer  # noqa: F401 (the thread that calls sys.excepthook)

    from swarmtrain import signals

    printed = []
    hook = signals.quiet_connection_errors_after_stop(lambda *info: printed.append(info[0]))
    hook(ConnectionResetError, ConnectionResetError(104, "reset"), None)
    assert printed == [ConnectionResetError]  # no stop yet: as always
    monkeypatch.setattr(signals, "_stop_signals", ["SIGTERM"])
    hook(ConnectionResetError, ConnectionResetError(104, "reset"), None)
    hook(EOFError, EOFError(), None)
    assert printed == [ConnectionResetError]
    hook(ValueError, ValueError("a real bug"), None)
    assert printed == [ConnectionResetError, ValueError]


def test_a_stop_signal_caught_by_hivemind_is_a_debug_line_not_a_traceback():
    """A SIGTERM that lands while hivemind's optimizer starts a gradient round raises our
    StopRequested inside hivemind, which catches BaseException there and logs it with a traceback
    (a CI run failed on that line in the systemd test). The peer still stops at its next check; the
    log gets one debug line. Reproduced with hivemind's own method and logger."""
    import logging
    from types import SimpleNamespace

    from hivemind.optim.optimizer import Optimizer

    from swarmtrain.cli.logs import OneLineForExpectedRoundFailures
    from swarmtrain.signals import StopRequested

    def step_interrupted(**_kwargs):
        raise StopRequested("SIGTERM")

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    hivemind_logger = logging.getLogger("hivemind.optim.optimizer")
    one_line, keep = OneLineForExpectedRoundFailures(), Keep()
    hivemind_logger.addFilter(one_line)
    hivemind_logger.addHandler(keep)
    level = hivemind_logger.level
    hivemind_logger.setLevel(logging.DEBUG)  # as with --verbose: the debug line is kept, so it can be read
    stand_in = SimpleNamespace(scheduled_grads=None, status_loglevel=logging.INFO,
                               tracker=SimpleNamespace(global_progress=SimpleNamespace(num_peers=2)),
                               grad_averager=SimpleNamespace(step=step_interrupted))
    try:
        began = Optimizer._begin_averaging_gradients(stand_in, None)
    finally:
        hivemind_logger.removeFilter(one_line)
        hivemind_logger.removeHandler(keep)
        hivemind_logger.setLevel(level)
    assert began is False  # hivemind swallowed it: the peer's own check between steps must stop it
    caught = [r for r in records if "StopRequested" in r.getMessage()]
    assert caught and all(r.exc_info is None and r.levelno == logging.DEBUG for r in caught), \
        [(r.levelname, r.getMessage(), r.exc_info) for r in records]


def test_a_request_pipe_from_an_exited_process_does_not_kill_the_dht_process():
    """The same race can end in EOFError, which hivemind's request loop does not catch (its DHT
    process died with a traceback): the DHT's request pipe turns it into the ConnectionError that
    hivemind logs and skips, and the log filter makes that one debug line."""
    import logging

    from swarmtrain.cli.logs import OneLineForExpectedRoundFailures
    from swarmtrain.net.dht import RequestPipe

    class HalfHandedOver:  # the sender exited while its reply pipe was being handed over
        def recv(self):
            def rebuild_connection():
                raise EOFError

            rebuild_connection()

    class Closed:  # the request pipe itself is closed: that must not be hidden
        def recv(self):
            raise EOFError

    with pytest.raises(ConnectionResetError) as caught:
        RequestPipe(HalfHandedOver()).recv()
    with pytest.raises(EOFError):
        RequestPipe(Closed()).recv()

    record = logging.LogRecord("hivemind.dht.dht", logging.ERROR, __file__, 1, "reset", None,
                               (ConnectionResetError, caught.value, caught.value.__traceback__), func="_run")
    OneLineForExpectedRoundFailures().filter(record)
    assert record.exc_info is None and record.levelno == logging.DEBUG


def test_a_groupmates_broken_stream_after_its_round_is_a_debug_line_not_a_traceback():
    """A round cut short stops reading a groupmate's stream while hivemind's prefetching task holds
    the stream's connection error in a future nobody awaits: asyncio reports it with a traceback when
    the future is collected (one CI run failed on it). Reproduced with hivemind's own amap_in_executor;
    the same error in any other orphaned future keeps its traceback."""
    import asyncio
    import gc
    import logging

    from hivemind.utils.asyncio import amap_in_executor

    from swarmtrain.cli.logs import DropHivemindOrphanedFutureNoise

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            if "never retrieved" in record.getMessage() or "stream broke" in record.getMessage():
                records.append(record)

    async def groupmate_stream():
        yield 1
        yield 2
        raise ConnectionResetError(104, "Connection reset by peer")

    async def round_cut_short():
        parts = amap_in_executor(lambda part: part, groupmate_stream(), max_prefetch=1)
        async for _ in parts:
            await asyncio.sleep(0.1)  # the stream breaks while the round still holds its first part
            break
        await parts.aclose()

    async def some_other_orphan():
        asyncio.get_running_loop().create_future().set_exception(ConnectionResetError(104, "elsewhere"))

    asyncio_logger, handler, noise = logging.getLogger("asyncio"), Keep(), DropHivemindOrphanedFutureNoise()
    level = asyncio_logger.level
    asyncio_logger.addHandler(handler)
    asyncio_logger.addFilter(noise)
    asyncio_logger.setLevel(logging.DEBUG)
    try:
        asyncio.run(round_cut_short())
        gc.collect()
        assert len(records) == 1 and records[0].levelno == logging.DEBUG and records[0].exc_info is None
        assert "stream broke" in records[0].getMessage()
        asyncio.run(some_other_orphan())
        gc.collect()
        assert len(records) == 2 and records[1].levelno == logging.ERROR and records[1].exc_info is not None
    finally:
        asyncio_logger.removeHandler(handler)
        asyncio_logger.removeFilter(noise)
        asyncio_logger.setLevel(level)


HEAVY_MODULES = ("torch", "hivemind", "transformers", "datasets", "matplotlib")
_IMPORTS_AFTER_HELP = """
import sys
from swarmtrain.cli import main
try:
    main(sys.argv[1:], prog_name="swarmtrain")
except SystemExit:
    pass
print("LOADED", *sorted(name for name in {HEAVY} if name in sys.modules))
"""


@pytest.mark.parametrize("args", [[], ["peer"], ["coordinator"], ["coordinator", "issue-token"], ["doctor"],
                                  ["demo"], ["audit"], ["identity"]], ids=lambda args: " ".join(args) or "swarmtrain")
def test_help_does_not_load_the_training_stack(args):
    """--help costs a volunteer's machine what the interpreter and click cost, not torch and
    hivemind (seconds of CPU: benchmarks/cli_startup.py)."""
    import subprocess
    import sys

    from tests.support import REPO

    code = _IMPORTS_AFTER_HELP.replace("{HEAVY}", repr(HEAVY_MODULES))
    result = subprocess.run([sys.executable, "-c", code, *args, "--help"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert "Usage:" in result.stdout, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "LOADED", result.stdout.splitlines()[-1]


_HIVEMIND_LOGS = """
import logging
from swarmtrain.cli.logs import adopt_library_logs, setup_logging
setup_logging(verbose=False)
adopt_library_logs()
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.utils.logging import get_logger
get_logger("hivemind.dht.routing").warning("a hivemind warning")
try:
    raise MatchmakingException("Unable to run All-Reduce: peer left")
except MatchmakingException as error:
    get_logger("hivemind.averaging.averager").exception(error)
get_logger("hivemind.dht.routing").info("hivemind chatter")
logging.getLogger("swarmtrain.peer").info("our own line")
"""


def test_hivemind_messages_come_in_our_format_once():
    """hivemind's own handler wrote its lines in another format, straight to the terminal (through the
    progress line), and repeated the round failures the peer already reports."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _HIVEMIND_LOGS], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HIVEMIND_LOGLEVEL": "WARNING"})
    lines = result.stderr.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "WARNING hivemind.dht.routing: a hivemind warning",
        "INFO swarmtrain.peer: our own line",
    ], result.stderr
