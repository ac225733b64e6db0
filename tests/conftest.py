import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "swarmtrain" / "configs" / "tiny.yaml"

# child processes (peers, coordinators) must not chat at hivemind's INFO level either
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")


def run_cli(*args, timeout=120, input=None):
    """Run `swarmtrain ARGS` as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "swarmtrain", *args], capture_output=True, text=True,
                          timeout=timeout, input=input)


@pytest.fixture
def tiny_config_text():
    return TINY_CONFIG.read_text()
