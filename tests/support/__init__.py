"""Helpers shared by the tests (imported as ``tests.support``; nothing here is a test).

- this module: paths, running ``swarmtrain`` as a user does, and checking a one-line error;
- ``swarm``: a real local swarm of ``swarmtrain`` processes (coordinator + peers) on 127.0.0.1;
- ``forked``: forked peer processes that build hivemind averagers and optimizers directly;
- ``prometheus``: a real Prometheus server started by the test;
- ``recording_peer``, ``poisoning_peer``: ``swarmtrain`` programs with a recorder or a saboteur inside.
"""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
TINY_CONFIG = REPO / "swarmtrain" / "configs" / "tiny.yaml"


def run_cli(*args, timeout=120, input=None, quiet_hivemind=False):
    """Run `swarmtrain ARGS` as a user would, in a fresh process (from the repository's root)."""
    env = dict(os.environ, HIVEMIND_LOGLEVEL="ERROR") if quiet_hivemind else None
    return subprocess.run([sys.executable, "-m", "swarmtrain", *args], capture_output=True, text=True,
                          timeout=timeout, input=input, env=env, cwd=REPO)


def assert_one_line_error(result, *fragments):
    """A user mistake: exit code != 0, no traceback, one "Error..." line holding every fragment."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
