"""`swarmtrain peer` on a slow machine: its held-out evaluations and checkpoint writes take as long as
an ALBERT-sized model's on a CPU (minutes, seconds), while its training steps stay the tiny model's.
The stop-path tests use it to show what a volunteer stopping such a peer gets: the checkpoint first,
the evaluation skipped, repeated signals honoured.

- ``SWARMTRAIN_SLOW_EVAL_SECONDS``: every held-out evaluation after the first (the one at start)
  takes this much longer;
- ``SWARMTRAIN_SLOW_SAVE_SECONDS``: every checkpoint write takes this much longer.

Usage: python tests/support/slow_peer.py peer --initial-peers ... (same arguments as swarmtrain)."""
import os
import time

from swarmtrain.cli import main
from swarmtrain.peer import trainer

EVAL_SECONDS = float(os.environ.get("SWARMTRAIN_SLOW_EVAL_SECONDS", "0"))
SAVE_SECONDS = float(os.environ.get("SWARMTRAIN_SLOW_SAVE_SECONDS", "0"))
_heldout_loss, _save_checkpoint = trainer.heldout_loss, trainer.save_checkpoint
_evaluations = []


def slow_heldout_loss(*args, **kwargs):
    _evaluations.append(time.time())
    if len(_evaluations) > 1:
        time.sleep(EVAL_SECONDS)
    return _heldout_loss(*args, **kwargs)


def slow_save_checkpoint(*args, **kwargs):
    time.sleep(SAVE_SECONDS)
    return _save_checkpoint(*args, **kwargs)


trainer.heldout_loss, trainer.save_checkpoint = slow_heldout_loss, slow_save_checkpoint

if __name__ == "__main__":
    main(prog_name="swarmtrain")
