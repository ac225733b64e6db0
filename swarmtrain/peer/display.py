"""What a volunteer sees: a live bar toward the swarm's next epoch, or a log line per epoch."""
from __future__ import annotations

import logging
import sys
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

logger = logging.getLogger("swarmtrain.peer")


class ProgressDisplay:
    """The live progress bar (on a terminal) or one log line per epoch.

    :param target_batch_size: samples per swarm epoch (the bar's length)
    :param enabled: show the live bar (None: when stderr is a terminal)
    """

    def __init__(self, target_batch_size: int, enabled: Optional[bool] = None):
        self.target = target_batch_size
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last_logged_epoch = None
        self._progress = None
        if self.enabled:
            self._progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                TextColumn("{task.completed:.0f}/{task.total:.0f} samples, next epoch in {task.fields[eta]}"),
                TextColumn("| step {task.fields[step]} loss {task.fields[loss]} {task.fields[speed]} samples/s"),
                TextColumn("| {task.fields[peers]} peers, last round: {task.fields[last_round]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task(
                "swarm", total=target_batch_size, epoch=0, eta="?", step=0, loss="-", speed="-", peers="?",
                last_round="none yet",
            )

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def update(self, *, step: int, epoch: int, loss: Optional[float], samples: int, eta: float, peers: int,
               last_round, samples_per_second: float) -> None:
        if last_round is None:
            round_text = "none yet" if peers > 1 else "none (no other peers yet)"
        elif last_round.ok:
            round_text = f"{last_round.group_size} peers in {last_round.seconds:.1f}s"
        else:
            round_text = f"failed ({last_round.note or 'no group'})"[:60]
        if self._progress is not None:
            self._progress.update(
                self._task, completed=min(samples, self.target), epoch=epoch,
                eta=f"{max(eta, 0):.0f}s" if eta == eta and eta < 1e6 else "?", step=step,
                loss=f"{loss:.3f}" if loss is not None else "-", speed=f"{samples_per_second:.1f}",
                peers=peers, last_round=round_text,
            )
        elif epoch != self._last_logged_epoch:
            self._last_logged_epoch = epoch
            logger.info(
                f"epoch {epoch}: step {step}, loss {loss:.3f}, {samples_per_second:.1f} samples/s, "
                f"{peers} peers, last round: {round_text}" if loss is not None else f"epoch {epoch}"
            )
