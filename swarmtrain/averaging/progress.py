"""hivemind's ProgressTracker with fewer, better-timed progress reports and a swarm epoch that no
single record decides (see SwarmProgressTracker)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Collection, Dict, Mapping, Optional

from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.utils import get_dht_time

from swarmtrain.hivemind_compat import tracker_public_key
from swarmtrain.net.claims import plausible_time, quorum_epoch

logger = logging.getLogger("swarmtrain.peer")
PROGRESS_REPORT_PERIOD = 1.0  # seconds between a peer's progress records (hivemind: after every step)
# a read of the swarm's progress returns every peer's record: in a swarm of more than this many peers,
# reads are spaced in proportion to its size, so that what a peer reads per second stays bounded
PROGRESS_READ_PEERS = 4
MAX_KNOWN_KEYS = 4096  # progress keys remembered as "seen before", at most
IGNORED_CLAIM_LOG_PERIOD = 60.0  # seconds between warnings about progress records claiming far-off epochs


def credible_epoch(local_epoch: int, claims: Mapping[bytes, int], *, own_vote: bool,
                   known: Collection[bytes]) -> int:
    """The swarm epoch this peer believes, from the other full peers' claimed epochs.

    hivemind takes the largest epoch any record claims: one record saying epoch 10**6 made every peer
    wait for, then try to download, a state nobody has. Here the epoch is the highest a strict majority
    of the voters reach (the other full peers, and this one once it has trained with the swarm:
    ``own_vote``), never below our own. hivemind relies on one more case: the first peer to count
    enough samples moves to the next epoch and the others follow it. So a claim of exactly
    ``local_epoch + 1`` is followed alone, if its key was ``known`` from an earlier read (a fresh key
    claiming the next epoch is not enough). One hostile record therefore moves this peer by at most
    one epoch, and only if it says exactly the next one.

    :param local_epoch: this peer's epoch
    :param claims: subkey -> epoch, of the other full (non-client) peers' fresh records
    :param own_vote: count this peer's own epoch among the voters
    :param known: subkeys seen in earlier reads
    """
    votes = list(claims.values()) + ([local_epoch] if own_vote else [])
    epoch = max(local_epoch, quorum_epoch(votes) or 0)
    if epoch == local_epoch and any(claimed == local_epoch + 1 and key in known for key, claimed in claims.items()):
        epoch = local_epoch + 1
    return epoch


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
    """hivemind's ProgressTracker with five changes.

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
    - What the others' records claim is read with suspicion (``_parse_swarm_progress_data``): a record
      whose time is not fresh by our clock is ignored, and the swarm's epoch is ``credible_epoch``'s, not
      the largest claim; records beyond it do not count (neither their samples nor their speed).

    :param start: start the tracker's thread at once
    :param report_period: seconds between this peer's progress reports, at least
    :param args, kwargs: hivemind's ProgressTracker's
    """

    def __init__(self, *args, start: bool, report_period: float = PROGRESS_REPORT_PERIOD, **kwargs):
        self.votes_own_epoch = False  # set once this peer has stepped (or loaded the state) with the swarm
        # the newest credible epoch another full peer claims (None: no other peer's record yet): the
        # newest state a download can get
        self.newest_other_epoch: Optional[int] = None
        self._known_keys: Dict[bytes, float] = {}  # progress subkeys read before -> when last read
        self._ignored_logged_at = -float("inf")
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
        if progress.num_peers <= 1 or not self.votes_own_epoch:
            # hivemind spaces reads by the ETA's share (up to max_refresh_period, 10 s) and meanwhile counts
            # only its own samples. Two cases where that ETA means nothing:
            # - alone: at a run's start peers publish nothing before their first sample, so the first
            #   reads see nobody, and a fast peer ended its first epoch alone, one epoch ahead of the
            #   others from then on (its rounds met theirs of the epoch before: partial all-reduces and
            #   resyncs, seen on loopback);
            # - before this peer's first step with the swarm: the throughput estimates are still near
            #   zero, the ETA minutes, and a peer read again only 10 s on, after the others had moved
            #   to the next epoch without it (the demo's third peer, seen once).
            # Then read as often as hivemind does when it sees no record at all (stretched by the swarm's
            # size, as above): for one epoch, or while alone, where a read is one record
            progress.next_fetch_time = min(progress.next_fetch_time, now + self.default_refresh_period * stretch)

    def _parse_swarm_progress_data(self, metadata):
        if isinstance(metadata, dict) and metadata:
            metadata = self._credible_progress(metadata)
        return super()._parse_swarm_progress_data(metadata)

    def _credible_progress(self, metadata: dict) -> dict:
        """The records that count: fresh ones, and only up to ``credible_epoch``."""
        now, own = get_dht_time(), tracker_public_key(self)
        fresh, claims = {}, {}
        for subkey, entry in metadata.items():
            if entry.value is None:  # a goodbye
                fresh[subkey] = entry
                continue
            try:
                progress = LocalTrainingProgress.parse_obj(entry.value)
            except Exception:
                continue  # (hivemind's own parser would raise on it in the fetcher thread)
            if not plausible_time(progress.time, self.metadata_expiration, now):
                continue
            fresh[subkey] = entry
            if not progress.client_mode and subkey != own:
                claims[subkey] = progress.epoch
        epoch = credible_epoch(self.local_progress.epoch, claims, own_vote=self.votes_own_epoch,
                               known=self._known_keys)
        ignored = [claimed for claimed in claims.values() if claimed > epoch]
        self.newest_other_epoch = max((claimed for claimed in claims.values() if claimed <= epoch), default=None)
        if ignored and time.monotonic() - self._ignored_logged_at > IGNORED_CLAIM_LOG_PERIOD:
            self._ignored_logged_at = time.monotonic()
            logger.warning(f"ignoring {len(ignored)} progress record(s) claiming epoch {max(ignored)}: the swarm's "
                           f"majority is at epoch {epoch} (a peer that is out of step, or a forged record)")
        self._remember_keys(claims, now)
        return {subkey: entry for subkey, entry in fresh.items()
                if entry.value is None or entry.value.get("epoch", 0) <= epoch}

    def _remember_keys(self, claims: Mapping[bytes, int], now: float) -> None:
        for subkey in claims:
            self._known_keys[subkey] = now
        if len(self._known_keys) > MAX_KNOWN_KEYS:
            for subkey in sorted(self._known_keys, key=self._known_keys.get)[:-MAX_KNOWN_KEYS]:
                del self._known_keys[subkey]

    def update_epoch(self, new_epoch: Optional[int] = None) -> int:
        self.votes_own_epoch = True  # we stepped with the swarm: our epoch is a vote from now on
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
                           expiration_time=get_dht_time() + self.metadata_expiration,
                           return_future=True).result(timeout=timeout or 5.0)
        except Exception:
            pass  # the DHT is already gone: nobody to say goodbye to
