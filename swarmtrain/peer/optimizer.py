"""hivemind.Optimizer configured from the run config, plus a record of every averaging round."""
from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
from concurrent.futures import InvalidStateError
from dataclasses import dataclass
from functools import partial
from typing import List, Optional

import hivemind
import torch
import transformers
from hivemind.compression import NoCompression
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarmtrain.compression.averager import make_grad_averager_factory
from swarmtrain.compression.feedback import DensitySchedule
from swarmtrain.compression.robust import robust_policy_from_config
from swarmtrain.compression.spec import parse_compression_spec
from swarmtrain.config import OptimizerConfig, RunConfig
from swarmtrain.signals import raise_if_stop_requested

logger = logging.getLogger("swarmtrain.peer")
FINGERPRINT_SIZE = 64  # parameter values gathered from every member in each round
DEFAULT_UPLOAD_MBPS = 100.0


def make_torch_optimizer_factory(config: OptimizerConfig):
    """LAMB (the DeDLOC/sahajBERT choice), AdamW, or AdamW with a frozen variance (adamw_frozen, for
    sparse averaging); bitsandbytes 8-bit state when asked."""

    def create(params):
        common = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
        if config.name == "adamw_frozen":
            from swarmtrain.peer.frozen_adam import FrozenVarianceAdamW

            # hivemind initialises the optimizer state with one zero-gradient step (state_averager.
            # initialize_optimizer_state_) and it counts in the step counter: +1 so that exactly
            # freeze_variance_after epochs of real gradients update the variance
            return FrozenVarianceAdamW(params, **common, freeze_variance_after=config.freeze_variance_after + 1)
        if config.name == "lamb" or config.eight_bit:
            import bitsandbytes as bnb  # imported only when used: its import is slow and chatty

            cls = {
                ("lamb", False): bnb.optim.LAMB,
                ("lamb", True): bnb.optim.LAMB8bit,
                ("adamw", True): bnb.optim.AdamW8bit,
            }[config.name, config.eight_bit]
            return cls(params, **common)
        return torch.optim.AdamW(params, **common)

    return create


def make_scheduler_factory(config: OptimizerConfig):
    # hivemind steps the scheduler once per global epoch, so warm-up and decay count epochs
    return partial(
        transformers.get_linear_schedule_with_warmup,
        num_warmup_steps=config.warmup_epochs,
        num_training_steps=config.total_epochs,
    )


NO_OTHER_PEERS = "no other peers"  # a RoundRecord's note when the peer stepped alone: no round was attempted


@dataclass
class RoundRecord:
    epoch: int
    group_size: int  # 0 when the round failed or was skipped
    ok: bool
    seconds: float
    note: str = ""
    group: str = ""  # the members' short id (same members, same id): tools compare a round's members


def group_id(peer_ids) -> str:
    return hashlib.sha256(b"".join(sorted(peer.to_bytes() for peer in peer_ids))).hexdigest()[:12]


PROGRESS_REPORT_PERIOD = 1.0  # seconds between a peer's progress records (hivemind: after every step)


class _AtMostEvery(threading.Event):
    """An Event whose set() takes effect at most once per `period` seconds: a set() that comes sooner
    is deferred to the end of the period (not dropped, so the latest progress always goes out)."""

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


class _ProgressTrackerWithBlockingGoodbye(ProgressTracker):
    """hivemind's ProgressTracker with three changes.

    - It publishes this peer's progress (a signed record stored on several DHT nodes) after every
      local step; with small steps that chatter was most of what crossed a home link (about
      300 KB/s per peer with the tiny model, see benchmarks/wan.py). Reports now go out at most
      once per PROGRESS_REPORT_PERIOD, and at once when the epoch changes; the swarm's ETA
      extrapolates between reports from each peer's reported throughput anyway.
    - A new epoch brings the next read of the swarm's progress forward (see update_epoch).
    - It drops the future of its goodbye record on shutdown; when that future is garbage-collected
      before the DHT process reads the request, the DHT process logs a traceback and stalls its own
      shutdown. Same goodbye, but we wait for it."""

    def __init__(self, *args, start: bool, report_period: float = PROGRESS_REPORT_PERIOD, **kwargs):
        super().__init__(*args, start=False, **kwargs)
        self.should_report_progress = _AtMostEvery(report_period)
        if start:
            self.start()

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
            self.dht.store(self.training_progress_key, subkey=self._local_public_key, value=None,
                           expiration_time=get_dht_time() + self.metadata_expiration)
        except Exception:
            pass  # the DHT is already gone: nobody to say goodbye to


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that remembers how each gradient averaging round went.

    hivemind only logs the group size; the progress display, the demo summary and the tests need
    it as data. The override wraps the one method that sees the round's outcome (hivemind is
    pinned, so this private seam is stable)."""

    def __init__(self, *args, fingerprint_tolerance: float = 1e-4, **kwargs):
        self.rounds: List[RoundRecord] = []
        self.diverged = False  # set when the last round showed our parameters differ from the group's
        self.fingerprint_tolerance = fingerprint_tolerance
        self._fingerprint_cooldown = 0
        self._synced_epochs = 0  # epochs stepped with the swarm since we last took state from a peer
        super().__init__(*args, **kwargs)
        self._fingerprint_positions = self._choose_fingerprint_positions()
        # every gradient round also gathers each member's parameter fingerprint (a few hundred bytes),
        # so a peer that drifted -- it stepped alone before the others found it, its group split, or
        # its state download was one step stale -- learns it from the very next round instead of
        # training on apart for ever
        schedule_step = self.grad_averager.schedule_step if self.grad_averager is not None else None  # None: mode local

        def schedule_step_with_fingerprint(*args, **kwargs):
            kwargs.setdefault("gather", [self.local_epoch, self.parameter_fingerprint(), self._synced_epochs])
            return schedule_step(*args, **kwargs)

        if schedule_step is not None:
            self.grad_averager.schedule_step = schedule_step_with_fingerprint

    def _optimized_parameters(self) -> List[torch.Tensor]:
        return [p for group in self.state_averager.optimizer.param_groups for p in group["params"]]

    def _choose_fingerprint_positions(self, count: int = FINGERPRINT_SIZE) -> List[tuple]:
        sizes = [p.numel() for p in self._optimized_parameters()]
        flat = torch.randint(sum(sizes), (count,), generator=torch.Generator().manual_seed(0)).sort().values.tolist()
        positions, offset, index = [], 0, 0
        for position in flat:  # (parameter index, offset inside it): the same on every peer
            while position >= offset + sizes[index]:
                offset += sizes[index]
                index += 1
            positions.append((index, position - offset))
        return positions

    def parameter_fingerprint(self) -> List[float]:
        """The parameters' values at fixed pseudo-random positions, the same on every peer.

        Peers in sync differ only by float rounding (dense averaging adds each peer's own
        (average - own part) back to its own tensor: ~1e-8), while a peer one step off differs by
        about the learning rate everywhere, so a handful of positions compared with a tolerance
        tells the two apart without moving the parameters over the network."""
        params = self._optimized_parameters()
        with torch.no_grad():
            return [float(params[index].view(-1)[offset]) for index, offset in self._fingerprint_positions]

    def _check_fingerprints(self, group: dict) -> None:
        members = {peer: data for peer, data in group.items() if _is_fingerprint_record(data)}
        mine = members.get(self.dht.peer_id)
        if mine is None:
            return
        if self._fingerprint_cooldown > 0:
            # the next pre-scheduled round may still carry the fingerprint from before a resync
            self._fingerprint_cooldown -= 1
            return
        reference = reference_fingerprint(members, self.fingerprint_tolerance)
        self.diverged = not fingerprints_match(mine[1], reference, self.fingerprint_tolerance)

    def resynchronised(self) -> None:
        self.diverged = False
        self._fingerprint_cooldown = 2

    def load_state_from_peers(self, *, max_wait: Optional[float] = None, **kwargs) -> bool:
        """Download the swarm's current state; True when we got the epoch the swarm is at.

        hivemind's version has two flaws that leave a joiner one step stale for ever in sync mode:
        a donor that has not yet applied the epoch's step serves epoch E-1, and hivemind then
        relabels the joiner as E ("catching up") with E-1's parameters; and a download that found
        no donor counts as success. It also retries failures for ever (hivemind#653). Here: ask
        again (a random donor of the newest epoch each time, hivemind's tie-break, which also
        spreads joiners over donors) until the state is of the swarm's epoch or max_wait passes,
        and never relabel. A state with non-finite values (a broken or hostile donor) is refused:
        ask another donor, and in the end keep our own. Loading the gradient averager's buffers is
        skipped on purpose: they are overwritten by the next round before anyone reads them."""
        if self.scheduled_grads is not None and not self.scheduled_grads.done():
            # tag along with zero weight: cancelling would restart everyone's matchmaking. Forget
            # the round first: a stop request during the wait must not leave it for shutdown() to
            # cancel a second time (hivemind raises InvalidStateError on that)
            scheduled, self.scheduled_grads = self.scheduled_grads, None
            self._tag_along_with_zero_weight(scheduled)
        self.state_averager.step(wait_for_delayed_updates=True)
        max_wait = self._state_wait() if max_wait is None else max_wait
        deadline = time.monotonic() + max_wait
        own_state = self._snapshot_state()
        with self.tracker.pause_updates():
            wanted, attempt = self.tracker.global_epoch, 0
            while True:
                attempt += 1
                try:
                    self.state_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
                except Exception as error:  # a donor vanished mid-download: ask another
                    logger.warning(f"state download failed ({error!r}); trying another peer")
                finite = self.state_is_finite()
                if not finite:
                    logger.warning("a peer served a state with non-finite values; asking another")
                    self._restore_state(own_state)
                if finite and self.local_epoch >= wanted or time.monotonic() > deadline:
                    break
                raise_if_stop_requested()
                time.sleep(min(1.0 + 0.5 * attempt, 5.0))  # the donors are applying epoch `wanted` right now
            loaded = self.local_epoch >= wanted
            if not loaded:
                logger.warning(f"could only get the state of epoch {self.local_epoch} (the swarm is at {wanted}); "
                               f"training on, the next rounds' checks will resynchronise")
            self.tracker.report_local_progress(local_epoch=self.local_epoch, samples_accumulated=0)
            if not self.client_mode:
                self.state_averager.state_sharing_priority = self.local_epoch
            if self.use_gradient_averaging:
                self.grad_averager.reset_accumulated_grads_()
                if not self.client_mode:
                    self.grad_averager.state_sharing_priority = self.local_epoch
        self._synced_epochs = 0
        return loaded

    def state_is_finite(self) -> bool:
        """Parameters and optimizer statistics all finite (a NaN step or a bad download breaks this)."""
        tensors = list(self._optimized_parameters())
        for state in self.state_averager.optimizer.state.values():
            tensors.extend(value for value in state.values() if torch.is_tensor(value) and value.is_floating_point())
        return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)

    def _snapshot_state(self) -> dict:
        optimizer_state = self.state_averager.optimizer.state
        return {
            "epoch": self.local_epoch,
            "parameters": [p.detach().clone() for p in self._optimized_parameters()],
            "statistics": [{key: value.clone() if torch.is_tensor(value) else copy.deepcopy(value)
                            for key, value in optimizer_state[p].items()} for p in self._optimized_parameters()],
        }

    def _restore_state(self, snapshot: dict) -> None:
        # in place: the state averager shares these very tensors with its averaging process
        optimizer_state = self.state_averager.optimizer.state
        with torch.no_grad():
            for param, saved, statistics in zip(self._optimized_parameters(), snapshot["parameters"],
                                                snapshot["statistics"]):
                param.copy_(saved)
                for key, value in statistics.items():
                    current = optimizer_state[param].get(key)
                    if torch.is_tensor(current) and torch.is_tensor(value) and current.shape == value.shape:
                        current.copy_(value)
                    else:
                        optimizer_state[param][key] = value
        if self.state_averager.offload_optimizer:
            self.state_averager._apply_optimizer_parameters_()  # the model's parameters follow the optimizer's
        self.state_averager.local_epoch = snapshot["epoch"]

    def restore_checkpoint(self, model: torch.nn.Module, model_state: dict, optimizer_state: Optional[dict]) -> None:
        """Go back to a saved state in place (parameters and optimizer statistics)."""
        parameters = [model_state[name] for name, _ in model.named_parameters()]
        saved = (optimizer_state or {}).get("state", {})
        statistics = [{key: value for key, value in saved.get(index, {}).items()} for index in range(len(parameters))]
        self._restore_state({"epoch": int(saved.get("local_epoch", self.local_epoch)), "parameters": parameters,
                             "statistics": statistics})

    def _tag_along_with_zero_weight(self, control) -> None:
        """hivemind's version waits up to averaging_timeout inside `except BaseException`, which
        swallowed a Ctrl+C and kept a stopping peer around for half a minute. Same, but the wait
        notices a stop request."""
        if not control.triggered:
            control.weight = 0
            control.allow_allreduce()
        deadline = time.monotonic() + (self.averaging_timeout or 30.0)
        try:
            while not control.done() and time.monotonic() < deadline:
                raise_if_stop_requested()
                time.sleep(0.1)
        finally:
            if not control.done():
                try:
                    control.cancel()
                except InvalidStateError:
                    pass  # finished between the check and the cancel

    def _state_wait(self) -> float:
        # a donor is at most one averaging round away from serving the newest epoch
        return 2 * (self.averaging_timeout or 30.0) + 10.0

    @property
    def traffic(self) -> dict:
        """What the gradient averager measured (shared memory, written by its process): bytes sent
        and received from the serialized messages, the density sent, selection time..."""
        stats = self.grad_averager.stats
        return {**stats.snapshot(), "rejected_peers": stats.recent_rejections()}

    def _make_state_averager(self, **kwargs):
        # on a token-gated run its averaging RPCs (state downloads included) refuse peers without a
        # valid access token (swarmtrain.access); hivemind's own averager otherwise
        from swarmtrain.access import make_state_averager

        return make_state_averager(self, super()._make_state_averager, **kwargs)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return _ProgressTrackerWithBlockingGoodbye(
            dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size, client_mode=self.client_mode,
            status_loglevel=self.status_loglevel, start=True, **kwargs,
        )

    def _update_global_epoch(self, grad_scaler) -> None:
        epoch, recorded = self.local_epoch, len(self.rounds)
        super()._update_global_epoch(grad_scaler)
        if self.grad_averager is not None and len(self.rounds) == recorded:
            # hivemind stepped without calling the method below: alone, or a round that never started
            alone = self.tracker.global_progress.num_peers <= 1
            self.rounds.append(RoundRecord(epoch, 0, False, 0.0, NO_OTHER_PEERS if alone else
                                           "no round started; stepped on local gradients"))

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        started = time.perf_counter()
        epoch = self.local_epoch
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        seconds = time.perf_counter() - started
        if maybe_step_control is None:
            self.rounds.append(RoundRecord(epoch, 0, False, seconds, NO_OTHER_PEERS))
            return
        try:
            group = maybe_step_control.result(timeout=0)
            self.rounds.append(RoundRecord(epoch, len(group), True, seconds, group=group_id(group)))
            self._synced_epochs += 1
            self._check_fingerprints(group)
        except BaseException as error:  # the round failed; hivemind already fell back to local gradients
            self.rounds.append(RoundRecord(epoch, 0, False, seconds, repr(error)[:200]))


def _is_fingerprint_record(data) -> bool:
    return (isinstance(data, (list, tuple)) and len(data) == 3 and isinstance(data[1], list)
            and len(data[1]) == FINGERPRINT_SIZE and isinstance(data[2], int))


def fingerprints_match(a: List[float], b: List[float], tolerance: float) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def reference_fingerprint(members: dict, tolerance: float) -> List[float]:
    """The parameters a group should hold, from each member's [epoch, fingerprint, synced epochs].

    Every member applies the same average, so all should hold the same parameters whatever epoch
    number each believes it is at. The fingerprint that most members match wins; on a tie (a group
    of two that disagrees, say a veteran and a joiner whose download was stale) the one backed by
    the longest unbroken run of rounds with the swarm, then the larger peer ID -- a rule every
    member evaluates to the same answer, so exactly one side downloads the other's state."""

    def standing(peer):
        supporters = sum(fingerprints_match(members[peer][1], other[1], tolerance) for other in members.values())
        return supporters, members[peer][2], peer.to_bytes()

    return members[max(members, key=standing)][1]


def density_schedule_from_config(spec, averaging) -> Optional[DensitySchedule]:
    """A sparse spec's density per epoch: averaging.dense_warmup_epochs at density 1, then the geometric
    warm-up from 1/64 over averaging.density_warmup_epochs; None for a constant density."""
    if not spec.is_sparse or not (averaging.density_warmup_epochs or averaging.dense_warmup_epochs):
        return None
    return DensitySchedule(spec.density, initial=max(spec.density, 1 / 64), dense_epochs=averaging.dense_warmup_epochs,
                           warmup_epochs=averaging.density_warmup_epochs)


def make_optimizer(
    config: RunConfig,
    model: torch.nn.Module,
    dht: hivemind.DHT,
    *,
    batch_size: int,
    client_mode: bool,
    private_key: RSAPrivateKey,
    upload_mbps: Optional[float] = None,
) -> SwarmOptimizer:
    if config.averaging.mode == "local":  # local steps + averaging of model deltas: swarmtrain/peer/local.py
        from swarmtrain.peer.local import make_local_optimizer

        return make_local_optimizer(config, model, dht, batch_size=batch_size, client_mode=client_mode,
                                    private_key=private_key)
    averaging = config.averaging
    # hivemind's load balancing gives each peer a span of the reduction in proportion to this; every
    # peer reports one (a peer reporting none counts as its group's average), so the default is a
    # plain assumption, and a volunteer's --max-upload-mbps below it means less upload for them
    bandwidth = float(upload_mbps) if upload_mbps is not None else DEFAULT_UPLOAD_MBPS
    spec = parse_compression_spec(averaging.compression)
    schedule = density_schedule_from_config(spec, averaging)
    # the factory carries the codec (dense or sparse) and the options hivemind does not forward
    grad_averager_factory = make_grad_averager_factory(spec, density_schedule=schedule,
                                                       request_timeout=averaging.request_timeout,
                                                       robust_policy=robust_policy_from_config(averaging),
                                                       bandwidth=bandwidth)

    return SwarmOptimizer(
        dht=dht,
        run_id=config.run_id,
        target_batch_size=config.target_batch_size,
        batch_size_per_step=batch_size,
        optimizer=make_torch_optimizer_factory(config.optimizer),
        params=model.parameters(),
        scheduler=make_scheduler_factory(config.optimizer),
        matchmaking_time=averaging.matchmaking_time,
        averaging_timeout=averaging.averaging_timeout,
        grad_averager_factory=grad_averager_factory,
        # parameters are averaged in full precision when they are: fp16 would make peers differ
        state_averaging_compression=NoCompression(),
        load_state_compression=NoCompression(),
        average_state_every=averaging.state_averaging_every or 10**9,
        delay_state_averaging=False,
        averager_opts=dict(request_timeout=averaging.request_timeout, bandwidth=bandwidth),
        # a stale step moves parameters by about the learning rate (Adam, LAMB); float rounding
        # between peers in sync is orders of magnitude below this
        fingerprint_tolerance=0.05 * config.optimizer.lr,
        tracker_opts=dict(private_key=private_key, min_refresh_period=0.5, default_refresh_period=1.0),
        client_mode=client_mode,
        # per averager process (gradients, state): the whole peer must be out within ~10 s of Ctrl+C
        shutdown_timeout=3.0,
        verbose=False,
    )
