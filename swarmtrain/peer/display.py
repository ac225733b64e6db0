"""What a volunteer sees: a live line toward the swarm's next epoch (on a terminal), or a log line per
epoch. The live line fits the terminal's width, 80 columns included: the least useful fields give way
first, and the epoch and its ETA always stay."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from swarmtrain.averaging.rounds import NO_OTHER_PEERS
from swarmtrain.units import format_duration

logger = logging.getLogger("swarmtrain.peer")
MIN_BAR_WIDTH = 8
MAX_BAR_WIDTH = 30
SEPARATOR = " · "


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_last_round(last_round, peers: int) -> str:
    """The last averaging round in a few words; a peer alone has not failed at anything."""
    if last_round is None:
        return "none yet" if peers > 1 else "none (no other peers yet)"
    if last_round.ok:
        return f"{plural(last_round.group_size, 'peer')} in {last_round.seconds:.1f}s"
    if last_round.note == NO_OTHER_PEERS:
        return "alone (no other peers)"
    return f"failed ({last_round.note or 'no group'})"[:80]


@dataclass
class ProgressFields:
    epoch: int
    samples: int
    target: int
    eta: float  # seconds; inf or NaN when unknown
    step: int
    loss: Optional[float]
    samples_per_second: float
    peers: int
    last_round: str

    def parts(self) -> List[Tuple[int, str]]:
        """(priority, text) after the bar, in display order; the highest priority number goes first
        when the line is too long."""
        return [
            (1, f"{self.samples}/{self.target}"),
            (0, f"ETA {format_duration(self.eta)}"),
            (4, f"step {self.step}"),
            (2, f"loss {self.loss:.3f}" if self.loss is not None else "loss -"),
            (5, f"{self.samples_per_second:.1f} samples/s"),
            (3, plural(self.peers, "peer")),
            (6, f"last round: {self.last_round}"),
        ]


def fit_progress_line(fields: ProgressFields, width: int) -> Tuple[str, int, str]:
    """(text before the bar, bar width (0: no bar), text after it) within `width` columns."""
    head = f"epoch {fields.epoch}"
    parts = fields.parts()
    while True:
        tail = SEPARATOR.join(text for _, text in parts)
        room = width - len(head) - len(tail) - 2  # a space on each side of the bar
        if room >= MIN_BAR_WIDTH:
            return head, min(room, MAX_BAR_WIDTH), tail
        droppable = [part for part in parts if part[0] > 0]
        if not droppable:
            return head, 0, tail
        parts.remove(max(droppable, key=lambda part: part[0]))


class _ProgressLine:
    """A rich renderable: the line, laid out for the width the console gives it at each refresh."""

    def __init__(self, fields: ProgressFields):
        self.fields = fields

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        head, bar_width, tail = fit_progress_line(self.fields, options.max_width)
        grid = Table.grid(padding=(0, 1))
        if bar_width:
            grid.add_row(head, ProgressBar(total=max(self.fields.target, 1), completed=min(self.fields.samples,
                                           self.fields.target), width=bar_width), tail)
        else:
            grid.add_row(head, tail)
        yield grid


class ProgressDisplay:
    """The live progress line (on a terminal) or one log line per epoch.

    :param target_batch_size: samples per swarm epoch (the bar's length)
    :param enabled: show the live line (None: when stderr is a terminal)
    :param console: where the live line goes (default: stderr)
    """

    def __init__(self, target_batch_size: int, enabled: Optional[bool] = None, console: Optional[Console] = None):
        self.target = target_batch_size
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last_logged_epoch, self._epoch_logged_at = None, 0.0
        self._line = _ProgressLine(ProgressFields(0, 0, target_batch_size, float("inf"), 0, None, 0.0, 0, "none yet"))
        self._live = None
        if self.enabled:
            # log lines written to stderr meanwhile print above the live line (cli.logs writes to
            # the current sys.stderr, which Live redirects)
            self._live = Live(self._line, console=console or Console(stderr=True), refresh_per_second=4,
                              transient=False, redirect_stderr=True, redirect_stdout=False)

    def __enter__(self):
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.stop()

    def update(self, *, step: int, epoch: int, loss: Optional[float], samples: int, eta: float, peers: int,
               last_round, samples_per_second: float) -> None:
        fields = ProgressFields(epoch, samples, self.target, eta if eta == eta and eta < 1e9 else float("inf"), step,
                                loss, samples_per_second, peers, describe_last_round(last_round, peers))
        if self._live is not None:
            self._line.fields = fields
        elif epoch != self._last_logged_epoch:
            self._log_epoch(fields)

    def _log_epoch(self, fields: ProgressFields) -> None:
        """One line per epoch. At an epoch's first step the swarm has no ETA for the next one yet:
        the last epoch's duration stands in for it (marked ~)."""
        now = time.monotonic()
        eta = format_duration(fields.eta)
        if fields.eta == float("inf") and self._last_logged_epoch is not None:
            eta = f"~{format_duration((now - self._epoch_logged_at) / max(1, fields.epoch - self._last_logged_epoch))}"
        self._last_logged_epoch, self._epoch_logged_at = fields.epoch, now
        if fields.loss is None:
            logger.info(f"epoch {fields.epoch}: next epoch in {eta}")
            return
        logger.info(
            f"epoch {fields.epoch}: step {fields.step}, loss {fields.loss:.3f}, {fields.samples_per_second:.1f} "
            f"samples/s, {plural(fields.peers, 'peer')}, last round: {fields.last_round}, next epoch in {eta}"
        )
