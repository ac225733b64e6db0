"""Which epoch a re-synchronising peer waits for (swarmtrain.averaging.sync.SwarmOptimizer._servable_epoch),
read from what donors declare in a real hivemind DHT (two nodes in this process)."""
from types import SimpleNamespace

from hivemind.utils import get_dht_time

from swarmtrain.averaging.sync import SwarmOptimizer

PREFIX = "download_state_averager"


def _declare(dht, value, subkey=None) -> None:
    """What hivemind's averager stores for a donor: its state-sharing priority (our epoch) under its peer id."""
    subkey = dht.peer_id.to_bytes() if subkey is None else subkey
    assert dht.store(f"{PREFIX}.all_averagers", subkey=subkey, value=value, expiration_time=get_dht_time() + 60)


def _servable(dht, wanted: int, mode_sync: bool = True) -> int:
    optimizer = SimpleNamespace(dht=dht, state_averager=SimpleNamespace(prefix=PREFIX),
                                use_gradient_averaging=mode_sync)
    return SwarmOptimizer._servable_epoch(optimizer, wanted)


def test_a_resync_waits_for_no_epoch_beyond_what_another_donor_declares(two_dhts):
    me, other = two_dhts
    assert _servable(me, 3) == 3  # nobody declared anything: the progress records' epoch stands

    # a peer that stepped to 3, found itself apart and downloaded 2 declares 2 again: its progress
    # record may still say 3, but no donor can serve 3 now (our own declaration does not count)
    _declare(me, 3.0)
    _declare(other, 2.0)
    assert _servable(me, 3) == 2
    assert _servable(me, 1) == 1  # never above what was wanted

    # anyone can write under this key: what is not a finite number is not a donor's epoch
    _declare(other, float("inf"), subkey=b"hostile-inf")
    _declare(other, "ten", subkey=b"hostile-text")
    assert _servable(me, 3) == 2
    _declare(other, 5.0, subkey=b"third-donor")
    assert _servable(me, 3) == 3

    assert _servable(me, 3, mode_sync=False) == 3  # mode local judges its downloads itself
