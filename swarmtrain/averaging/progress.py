"""hivemind's ProgressTracker with fewer, better-timed progress reports (see SwarmProgressTracker)."""
from __future__ import annotations

import threading
import time
from typing import Optional

from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time

from swarmtrain.hivemind_compat import tracker_public_key

PROGRESS_REPORT_PERIOD = 1.0  # seconds between a peer's progress records (hivemind: after every step)
# a read of the swarm's progress returns every peer's record: in a swarm of more than this many peers,
# reads are spaced in proportion to its size, so that what a peer reads per second stays bounded
PROGRESS_READ_PEERS = 4


class AtMostEvery(threading.Event):
    """An Event whose set() takes effect at most once per `period` seconds: a set() that comes sooner
    is deferred to the end of the period (not dropped, so the latest progress always goes out).

    :param period: seconds
    """

    def __init__(self, period: float):
        super().__init__()
        self.period, self._last, self._timer = period, -float("inf"), None
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            wait = self._last + self.period - time.monotonic()
            if wait <= 0:
                self._set_locked()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._deferred)
                self._timer.daemon = True
                self._timer.start()

    def set_now(self) -> None:
        with self._lock:
            self._set_locked()

    def _deferred(self) -> None:
        with self._lock:
            self._timer = None
            self._set_locked()

    def _set_locked(self) -> None:
        self._last = time.monotonic()
        super().set()


class SwarmProgressTracker(ProgressTracker):
    """hivemind's ProgressTracker with four changes.

    - It publishes this peer's progress (a signed record stored on several DHT nodes) after every
      local step; with small steps that chatter was most of what crossed a home link (about
      300 KB/s per peer with the tiny model, see benchmarks/wan.py). Reports now go out at most
      once per PROGRESS_REPORT_PERIOD, and at once when the epoch changes; the swarm's ETA
      extrapolates between reports from each peer's reported throughput anyway.
    - A new epoch brings the next read of the swarm's progress forward (see update_epoch).
    - One read of the swarm's progress returns the N peers' signed records: hivemind reads every
      0.5-10 s whatever N, so what each peer reads grew with the swarm (and the swarm's total as N²).
      Its refresh bounds are stretched by N / PROGRESS_READ_PEERS beyond that size: bytes read per
      second per peer stay about constant, and between reads hivemind extrapolates each peer's
      progress from its reported throughput, as it does anyway.
    - It drops the future of its goodbye record on shutdown; when that future is garbage-collected
      before the DHT process reads the request, the DHT process logs a traceback and stalls its own
      shutdown. Same goodbye, but we wait for it.

    :param start: start the tracker's thread at once
    :param report_period: seconds between this peer's progress reports, at least
    :param args, kwargs: hivemind's ProgressTracker's
    """

    def __init__(self, *args, start: bool, report_period: float = PROGRESS_REPORT_PERIOD, **kwargs):
        super().__init__(*args, start=False, **kwargs)
        self._base_refresh = (self.min_refresh_period, self.max_refresh_period)
        self.should_report_progress = AtMostEvery(report_period)
        if start:
            self.start()

    @property
    def global_progress(self):
        return self._global_progress

    @global_progress.setter
    def global_progress(self, progress) -> None:
        # hivemind sets this after every read, with the next read's time computed from its refresh
        # bounds: stretch the bounds for the read after this one, and this read's interval alike
        self._global_progress = progress
        base = getattr(self, "_base_refresh", None)
        if base is None or progress is None:
            return  # hivemind's own __init__: the bounds are set up after it
        stretch = max(1.0, progress.num_peers / PROGRESS_READ_PEERS)
        self.min_refresh_period, self.max_refresh_period = base[0] * stretch, base[1] * stretch
        now = get_dht_time()
        if stretch > 1.0 and progress.next_fetch_time - now < self.min_refresh_period:
            progress.next_fetch_time = now + self.min_refresh_period

    def update_epoch(self, new_epoch: Optional[int] = None) -> int:
        epoch = super().update_epoch(new_epoch)
        self.should_report_progress.set_now()  # a new epoch is news the swarm's matchmaking waits for
        # ...and a moment to re-read the swarm's progress. hivemind waits for its ETA-based refresh,
        # which at a run's start (low throughput estimates, long ETAs) is seconds away: a peer that saw
        # nobody at its last read would meanwhile run one short epoch after another alone
        soon = get_dht_time() + self.min_refresh_period
        self.global_progress.next_fetch_time = min(self.global_progress.next_fetch_time, soon)
        self.global_state_updated.set()  # wakes the fetcher, which then waits until next_fetch_time
        return epoch

    def shutdown(self, timeout: Optional[float] = None):
        self.shutdown_triggered.set()
        self.should_report_progress.set_now()
        self.global_state_updated.set()
        self.shutdown_complete.wait(timeout)
        try:
            self.dht.store(self.training_progress_key, subkey=tracker_public_key(self), value=None,
                           expiration_time=get_dht_time() + self.metadata_expiration)
        except Exception:
            pass  # the DHT is already gone: nobody to say goodbye to
