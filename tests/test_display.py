"""What a volunteer reads: the live progress line at 80 columns, durations, round notes, plurals,
phase messages for long work (issue #16)."""
import io
import logging
import re
import time

import pytest
from rich.console import Console

from swarmtrain.averaging.rounds import NO_OTHER_PEERS, RoundRecord, describe_round_failure
from swarmtrain.coordinator.coordinator import progress_line
from swarmtrain.monitoring.reporter import count_failed_rounds
from swarmtrain.net.progress import SwarmProgress
from swarmtrain.peer.display import ProgressDisplay
from swarmtrain.phases import phase
from swarmtrain.units import format_duration

BUSY_SWARM = dict(step=334, epoch=12, loss=2.746, samples=336, eta=65.4, peers=2,
                  last_round=RoundRecord(11, 2, True, 1.23), samples_per_second=98.12)


def _render(width: int, **update) -> list:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=True, color_system=None, legacy_windows=False)
    display = ProgressDisplay(768, enabled=True, console=console)
    with display:
        display.update(**{**BUSY_SWARM, **update})
        display._live.refresh()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # cursor moves and line clears
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()]


@pytest.mark.parametrize("width", [80, 60, 120])
def test_progress_line_fits_the_terminal_with_epoch_and_eta(width):
    lines = _render(width)
    assert lines, "nothing rendered"
    for line in lines:
        assert len(line) <= width, (width, line)
        assert "…" not in line, line  # nothing cut mid-word
    last = lines[-1]
    assert "epoch 12" in last and "ETA 1m 05s" in last, last
    if width >= 80:
        assert "336/768" in last and "loss 2.746" in last, last
    if width >= 120:
        assert "2 peers" in last and "samples/s" in last, last


def test_progress_line_of_a_lone_peer_says_alone_not_failed():
    alone = RoundRecord(11, 0, False, 0.0, NO_OTHER_PEERS)
    [line] = _render(160, peers=1, last_round=alone)[-1:]
    assert "1 peer " in line + " " and "1 peers" not in line, line
    assert "alone" in line and "failed" not in line, line


def test_epoch_log_lines_carry_the_eta(caplog):
    display = ProgressDisplay(768, enabled=False)
    with caplog.at_level(logging.INFO, logger="swarmtrain.peer"):
        display.update(**{**BUSY_SWARM, "epoch": 12, "eta": 65.4})
        display.update(**{**BUSY_SWARM, "epoch": 13, "eta": float("inf"), "peers": 1})
    first, second = [record.getMessage() for record in caplog.records]
    assert first.endswith("next epoch in 1m 05s"), first
    assert "next epoch in ~" in second and "1 peer," in second, second  # estimated from the last epoch


def test_durations_read_like_durations():
    assert format_duration(84345) == "23h 25m"
    assert format_duration(65.4) == "1m 05s"
    assert format_duration(7.2) == "7s"
    assert format_duration(3 * 86400 + 4 * 3600) == "3d 04h"
    assert format_duration(float("inf")) == format_duration(float("nan")) == "?"


def test_coordinator_progress_line():
    line = progress_line(SwarmProgress(epoch=27, peers=1, clients=0, samples_accumulated=10,
                                       samples_per_second=0.01, eta_seconds=84345.0), 192)
    assert line == "epoch 27: 1 peer (0 clients), 10/192 samples, 0.0 samples/s, next epoch in 23h 25m"


def test_round_failures_are_sentences():
    from hivemind.averaging.matchmaking import MatchmakingException
    from hivemind.averaging.partition import AllreduceException

    sparse = MatchmakingException("Unable to run sparse all-reduce: StopAsyncIteration()")
    assert describe_round_failure(sparse) == "a group member left or stopped answering during the all-reduce"
    assert describe_round_failure(AllreduceException("Averaging step failed: could not find a group")) == \
        "no averaging group formed in time"
    assert describe_round_failure(TimeoutError()) == "the round timed out"
    assert describe_round_failure(ValueError("bad\nthings")) == "unexpected error (ValueError: bad)"


def test_a_lone_peers_rounds_are_not_failed_rounds():
    rounds = [RoundRecord(1, 0, False, 0.0, NO_OTHER_PEERS), RoundRecord(2, 2, True, 1.0),
              RoundRecord(3, 0, False, 2.0, "the round timed out")]
    assert count_failed_rounds(rounds) == 1


def test_long_phases_are_announced_and_short_ones_are_quiet(caplog):
    logger = logging.getLogger("swarmtrain.test-phases")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with phase("doing something quick", logger, announce_after=5.0):
            pass
        with phase("loading the corpus", logger, announce_after=0.05, repeat_every=0.1):
            time.sleep(0.3)
        with pytest.raises(KeyError):
            with phase("probing", logger, announce_after=0.0):
                time.sleep(0.05)
                raise KeyError("x")
    messages = [record.getMessage() for record in caplog.records]
    assert not any("quick" in message for message in messages), messages
    assert messages[0] == "loading the corpus…", messages
    assert any(message.startswith("still loading the corpus (") for message in messages), messages
    assert any(message.startswith("loading the corpus: done in ") for message in messages), messages
    assert messages[-1].startswith("probing: stopped in "), messages


def test_the_next_averaging_point_is_never_in_the_past():
    """A resumed peer (or one that downloaded a donor's state kept overdue by lone epochs) said "next
    averaging at epoch 16" while the swarm was at 27: an overdue point is due at the next epoch."""
    from types import SimpleNamespace

    from swarmtrain.averaging.local import LocalSwarmOptimizer
    from swarmtrain.averaging.schedule import ControllerState

    def next_point(next_epoch, local_epoch):
        optimizer = SimpleNamespace(schedule_state=ControllerState(next_epoch, 3, 12), local_epoch=local_epoch)
        return LocalSwarmOptimizer.next_averaging_epoch.fget(optimizer)

    assert next_point(16, 27) == 28
    assert next_point(30, 27) == 30
