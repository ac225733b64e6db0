import os

import pytest

from tests.support import TINY_CONFIG
from tests.support.prometheus import prometheus  # noqa: F401  (a fixture for every test module)

# child processes (peers, coordinators) must not chat at hivemind's INFO level either
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")


@pytest.fixture
def tiny_config_text():
    return TINY_CONFIG.read_text()


@pytest.fixture
def two_dhts():
    """Two real hivemind DHT nodes in this process, the second bootstrapped from the first."""
    import hivemind

    first = hivemind.DHT(start=True)
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), start=True)
    yield first, second
    second.shutdown()
    first.shutdown()
