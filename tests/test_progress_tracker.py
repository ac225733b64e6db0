"""SwarmProgressTracker's reads of the swarm's progress (swarmtrain/averaging/progress.py), with real
hivemind DHT nodes in this process."""
import time

from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarmtrain.averaging.progress import SwarmProgressTracker
from swarmtrain.signals import poll

DEFAULT_REFRESH = 1.0  # what swarmtrain.averaging.factory passes
MAX_REFRESH = 10.0  # hivemind's default, kept by swarmtrain


def _tracker(dht) -> SwarmProgressTracker:
    # (its own key: two trackers in one process would otherwise share hivemind's process-wide one, and
    # with it the subkey of their progress records)
    return SwarmProgressTracker(dht=dht, prefix="progresstest", target_batch_size=100_000, client_mode=False,
                                private_key=RSAPrivateKey(),
                                min_refresh_period=0.5, default_refresh_period=DEFAULT_REFRESH,
                                max_refresh_period=MAX_REFRESH, start=True)


def _wait_for(condition, timeout: float, what: str) -> float:
    """Seconds until `condition` held (the test fails after `timeout`)."""
    started = time.monotonic()
    assert poll(lambda: True if condition() else None, timeout=timeout, interval=0.05), f"timed out waiting for {what}"
    return time.monotonic() - started


def test_a_peer_alone_or_before_its_first_step_reads_again_soon(two_dhts):
    """At a run's start peers publish nothing before their first sample, so the first reads see only
    the reader. hivemind then reads again after the ETA's share, up to max_refresh_period (10 s), and
    meanwhile counts only its own samples: a fast peer ended its first epoch alone, one epoch ahead of
    the others for the rest of the run. Alone, or before its first step with the swarm, a peer now
    reads as often as when it sees no record."""
    first_dht, second_dht = two_dhts
    first = _tracker(first_dht)
    second = None
    try:
        first.report_local_progress(0, samples_accumulated=8)  # slow so far: its ETA is far beyond 10 s
        _wait_for(lambda: first.global_progress.num_peers == 1, 20, "the first peer to read its own record")
        assert first.global_progress.eta_next_epoch - get_dht_time() > MAX_REFRESH
        assert first.global_progress.next_fetch_time - get_dht_time() <= DEFAULT_REFRESH + 0.1

        second = _tracker(second_dht)
        second.report_local_progress(0, samples_accumulated=8)
        seconds = _wait_for(lambda: first.global_progress.num_peers == 2, 20, "the first peer to see the second")
        # within a few of its one-second reads (the newcomer's record takes a moment to publish), not
        # after hivemind's ten
        assert seconds < MAX_REFRESH / 2, seconds
        # the newcomer, which has not stepped with the swarm yet, also reads again within the period:
        # its ETA, from throughputs still near zero, says nothing about when the others move on
        _wait_for(lambda: second.global_progress.num_peers == 2, 20, "the second peer to see the first")
        assert second.global_progress.eta_next_epoch - get_dht_time() > MAX_REFRESH
        assert second.global_progress.next_fetch_time - get_dht_time() <= DEFAULT_REFRESH + 0.1
    finally:
        for tracker in (second, first):
            if tracker is not None:
                tracker.shutdown(timeout=5)
