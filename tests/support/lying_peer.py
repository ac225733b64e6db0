"""`swarmtrain peer` whose reducers lie (see tests/support/lying.py for the attacks): it trains and sends
honest gradients, but as a reducer answers its groupmates with something else than the average.

Usage: python tests/support/lying_peer.py ATTACK peer --initial-peers ... (ATTACK e.g. scale:10)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.support

from swarmtrain.cli import main  # noqa: E402
from tests.support import lying  # noqa: E402

if __name__ == "__main__":
    lying.install(sys.argv.pop(1))
    main(prog_name="swarmtrain")
