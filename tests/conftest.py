import os

import pytest

from tests.support import TINY_CONFIG
from tests.support.prometheus import prometheus  # noqa: F401  (a fixture for every test module)

# child processes (peers, coordinators) must not chat at hivemind's INFO level either
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")


@pytest.fixture
def tiny_config_text():
    return TINY_CONFIG.read_text()
