"""The trunk host of a split run (`swarmtrain peer --role trunk`): it hosts the layers after the cut for
data owners (privacy.split.TrunkHost on its DHT's P2P daemon), announces itself, and averages the
trunk with the other trunk hosts (see swarmtrain.privacy.swarm for the whole picture)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import asdict
from typing import Any, Callable, List, Sequence, Tuple

import torch
from hivemind.averaging import DecentralizedAverager

from swarmtrain.access.guard import access_record_key, guarded_class
from swarmtrain.averaging.rounds import RoundRecord
from swarmtrain.errors import UserError
from swarmtrain.hivemind_compat import CleanShutdownMixin
from swarmtrain.monitoring.status import PeerStatus
from swarmtrain.signals import children_ignore_interrupts

from .config import SplitConfig
from .digits import NUM_CLASSES
from .split import TrunkHost
from .swarm import ANNOUNCE_PERIOD, SplitRole, announce_trunk, find_trunks, run_in_loop_thread, split_models

logger = logging.getLogger("swarmtrain.split")

TRUNK_STATE_FORMAT = "swarmtrain.split.trunk/1"  # marks a downloaded trunk state (metadata["format"])
LOAD_ATTEMPTS = 3          # a late trunk host tries this many times to download the current trunk...
LOAD_RETRY_DELAY = 3.0     # ...this many seconds apart (a host that has just trained may not have declared yet)


class LockedTrunkHost(TrunkHost):
    """TrunkHost whose steps hold a thread lock, so the averaging thread never sees half a step.

    :param params_lock: held during each step and evaluation (and by the averaging thread)
    :param args, kwargs: TrunkHost's
    """

    def __init__(self, *args, params_lock: threading.Lock, **kwargs):
        super().__init__(*args, **kwargs)
        self.params_lock = params_lock

    def _train_step(self, z, y):
        with self.params_lock:
            return super()._train_step(z, y)

    def _evaluate(self, z):
        with self.params_lock:
            return super()._evaluate(z)


def parameter_norm(module: torch.nn.Module) -> float:
    """L2 norm of all parameters: shows in the status file whether a trunk moved (by steps or averaging)."""
    with torch.no_grad():
        return float(torch.sqrt(sum((p.double() ** 2).sum() for p in module.parameters())))


class TrunkStateAverager(CleanShutdownMixin, DecentralizedAverager):
    """The trunk hosts' averager. A newcomer's load_state_from_peers downloads the *live* trunk (copied
    under the params lock), not the averaging buffer, which is only filled at each round.

    :param trunk: the live trunk, served to newcomers
    :param params_lock: held while the live trunk is copied
    :param steps: how many steps this host took (sent with the state)
    :param averaged_tensors, dht, kwargs: DecentralizedAverager's
    """

    def __init__(self, averaged_tensors, dht, *, trunk: torch.nn.Module, params_lock: threading.Lock,
                 steps: Callable[[], int], **kwargs):
        self._trunk, self._params_lock, self._steps = trunk, params_lock, steps  # used in this (host) process
        super().__init__(averaged_tensors, dht, **kwargs)

    def get_current_state(self):
        with self._params_lock, torch.no_grad():
            tensors = [p.detach().clone() for p in self._trunk.parameters()]
        return {"format": TRUNK_STATE_FORMAT, "steps": int(self._steps())}, tensors, None


def validate_trunk_state(state: Any, reference: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], int]:
    """(tensors, donor's steps) of a downloaded trunk state if it fits `reference` (the trunk's
    parameters): the format marker, as many tensors, each of the same shape, floating point and
    finite. Raises ValueError naming the first problem."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError("not a (metadata, tensors) pair")
    metadata, tensors = state
    if not isinstance(metadata, dict) or metadata.get("format") != TRUNK_STATE_FORMAT:
        raise ValueError(f"not a trunk state (format {metadata.get('format') if isinstance(metadata, dict) else None!r}, "
                         f"expected {TRUNK_STATE_FORMAT!r})")
    if not isinstance(tensors, (tuple, list)) or len(tensors) != len(reference):
        raise ValueError(f"{len(tensors) if isinstance(tensors, (tuple, list)) else 'no'} tensors, expected {len(reference)}")
    checked = []
    for index, (tensor, param) in enumerate(zip(tensors, reference)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"tensor {index} is not a floating-point tensor")
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"tensor {index} has shape {list(tensor.shape)}, expected {list(param.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {index} contains NaN or Inf")
        checked.append(tensor.detach().to(dtype=param.dtype, device=param.device))
    steps = metadata.get("steps")
    return checked, steps if isinstance(steps, int) and steps >= 0 else 0


class TrunkAverager:
    """Averages the trunk's parameters with the other trunk hosts every `period` seconds (a thread,
    started by start() once the trunk is loaded), and shares the trunk with later hosts once it holds
    more than the initial weights.

    :param trunk: the trunk (its parameters are averaged in place)
    :param dht: this host's DHT
    :param run_id: the run (the averager's prefix is f"{run_id}_trunk")
    :param split: the run's privacy.split settings (period and timeout of the rounds)
    :param params_lock: held while the trunk is read or written
    :param client_mode: whether other peers can dial this host
    :param matchmaking_time: the run's averaging.matchmaking_time
    :param request_timeout: the run's averaging.request_timeout
    :param steps: how many optimizer steps this host took on the trunk
    :param access: on a token-gated run, this node's LocalAccess (the averager is guarded); None otherwise
    """

    def __init__(self, trunk: torch.nn.Module, dht, run_id: str, split: SplitConfig, params_lock: threading.Lock,
                 *, client_mode: bool, matchmaking_time: float, request_timeout: float,
                 steps: Callable[[], int] = lambda: 0, access=None):
        self.trunk, self.dht, self.run_id, self.split, self.lock = trunk, dht, run_id, split, params_lock
        self.steps = steps  # optimizer steps this host took on the trunk
        self.rounds: List[RoundRecord] = []
        # set by the serving loop from the DHT's announcements (this thread makes no DHT calls: the
        # DHT's pipe to its process is not meant for concurrent senders)
        self.others_present = False
        self.loaded = False  # the trunk came from another host (load_from_peers)
        self.averaged_away = False  # an averaging round moved the trunk off the initial weights
        with torch.no_grad():
            self.initial = [p.detach().clone() for p in trunk.parameters()]
        averager_class, guard = TrunkStateAverager, {}
        if access is not None:  # a token-gated run: the same guard as the training averagers
            averager_class = guarded_class(TrunkStateAverager)
            guard = dict(access=access, access_key=access_record_key(run_id))
        self.averager = averager_class(
            [p.detach().clone() for p in trunk.parameters()], dht, prefix=f"{run_id}_trunk", start=True,
            client_mode=client_mode, min_matchmaking_time=matchmaking_time, request_timeout=request_timeout,
            # hivemind bounds only matchmaking by the step's timeout: a groupmate counted into the group
            # that had given up on it (hivemind's matchmaking race) held a host's round, and its every
            # later round, for ever (a CI run: a host averaged once, then never again in 70 s)
            allreduce_timeout=split.averaging_timeout,
            allow_state_sharing=False, trunk=trunk, params_lock=params_lock, steps=steps, **guard)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trunk-averaging", daemon=True)

    @property
    def sharing(self) -> bool:
        return self.averager.allow_state_sharing

    def start(self) -> None:
        self._thread.start()

    def load_from_peers(self, attempts: int = LOAD_ATTEMPTS, retry_delay: float = LOAD_RETRY_DELAY) -> bool:
        """Replace the trunk with the current trunk of another host (downloaded, then checked); on
        failure, one log line, and the trunk stays as it was. Call before start()."""
        params = list(self.trunk.parameters())
        reason = "no trunk host sent its trunk"
        for attempt in range(attempts):
            if attempt:
                time.sleep(retry_delay)
            try:
                state = self.averager.load_state_from_peers(timeout=self.split.averaging_timeout)
            except Exception as error:  # a timeout, the averager going away
                reason = f"{type(error).__name__}: {error}"
                continue
            if state is None:
                reason = "no trunk host sent its trunk (none has trained yet, or none answered)"
                continue
            try:
                tensors, donor_steps = validate_trunk_state(state, params)
            except ValueError as error:
                reason = f"refused a downloaded trunk: {error}"
                continue
            with self.lock, torch.no_grad():
                for param, tensor in zip(params, tensors):
                    param.copy_(tensor)
            self.loaded = True
            self.averager.allow_state_sharing = True  # it holds the swarm's trunk now: later hosts may load it
            logger.info(f"loaded the current trunk from another trunk host (it had taken {donor_steps} step(s))")
            return True
        logger.warning(f"could not load the current trunk from the other trunk hosts ({reason}; {attempts} "
                       "attempt(s)): starting from the initial trunk weights")
        return False

    def _moved_from_initial(self) -> bool:
        with self.lock, torch.no_grad():
            return any((p - i).abs().max() > 1e-6 for p, i in zip(self.trunk.parameters(), self.initial))

    def share_if_trained(self) -> bool:
        """Let later hosts download the trunk once it holds more than the initial weights (it trained,
        was loaded, or averaged with a trained trunk): a newcomer must not get the initial weights
        from another newcomer."""
        if not self.sharing and (self.loaded or self.steps() > 0 or self.averaged_away):
            self.averager.allow_state_sharing = True
            logger.info("the trunk has trained: sharing it with trunk hosts that join later")
        return self.sharing

    def _loop(self) -> None:
        tick = min(1.0, self.split.average_every)
        next_round = time.monotonic() + self.split.average_every
        while not self._stop.wait(tick):
            try:
                self.share_if_trained()  # the averager's calls stay in this thread
                if time.monotonic() < next_round:
                    continue
                if self.others_present:  # alone: nothing to average with
                    self.average_once()
                next_round = time.monotonic() + self.split.average_every
            except Exception as error:  # a failed round must not end the host
                next_round = time.monotonic() + self.split.average_every
                logger.warning(f"trunk averaging failed: {type(error).__name__}: {error}")

    def average_once(self) -> RoundRecord:
        started = time.monotonic()
        params = list(self.trunk.parameters())
        with self.lock, torch.no_grad(), self.averager.get_tensors() as tensors:
            snapshot = [p.detach().clone() for p in params]
            for tensor, param in zip(tensors, params):
                tensor.copy_(param)
        try:
            gathered = self.averager.step(timeout=self.split.averaging_timeout, allow_retries=False)
        except Exception as error:  # no group, a groupmate left, timeout: keep the local trunk
            logger.debug(f"trunk averaging round failed: {type(error).__name__}: {error}")
            gathered = None
        ok = gathered is not None and len(gathered) > 1
        if ok:
            with self.lock, torch.no_grad(), self.averager.get_tensors() as tensors:
                for tensor, param, before in zip(tensors, params, snapshot):
                    param.add_(tensor - before)  # keep the steps taken while the round ran
            self.averaged_away = self.averaged_away or self._moved_from_initial()
        record = RoundRecord(epoch=len(self.rounds), group_size=len(gathered) if ok else 0, ok=ok,
                                seconds=time.monotonic() - started, note="" if ok else "no group")
        self.rounds.append(record)
        logger.info(f"trunk averaging: {'averaged with ' + str(record.group_size - 1) + ' other host(s)' if ok else 'no group'}"
                    f" in {record.seconds:.1f}s")
        return record

    def shutdown(self) -> None:
        self._stop.set()
        started = self._thread.ident is not None
        if started:
            self._thread.join(timeout=1.0)  # a round in flight fails when the averager stops: do not wait for it
        self.averager.shutdown()
        if started:
            self._thread.join(timeout=5.0)

class TrunkHostRole(SplitRole):
    """`swarmtrain peer --role trunk` (the default role on a split run): host the trunk for data owners,
    announce it, and average it with the other trunk hosts, until stopped. Constructed like SplitRole."""

    role = "trunk"

    def __init__(self, swarm, options, status: PeerStatus, machine=None):
        super().__init__(swarm, options, status, machine)
        config = self.config
        if swarm.client_mode:
            raise UserError("a trunk host must accept incoming connections (data owners call it): it cannot run in "
                            "client mode; forward a port (--port, --public-ip) or join as a data owner")
        self.trunk = split_models(self.split, config.seed).classifier
        lock = threading.Lock()
        self.averager = None
        self.start_reporting()
        self.host = LockedTrunkHost(self.trunk, torch.optim.Adam(self.trunk.parameters(), lr=self.split.lr),
                                    activation_shape=(self.split.cut_width,), num_classes=NUM_CLASSES,
                                    run_id=config.run_id, max_batch_size=max(1024, self.split.batch_size),
                                    params_lock=lock, authorize=self.gate.allows if self.gate is not None else None)
        with children_ignore_interrupts():
            self.averager = TrunkAverager(self.trunk, swarm.dht, config.run_id, self.split, lock,
                                          client_mode=swarm.client_mode,
                                          matchmaking_time=config.averaging.matchmaking_time,
                                          request_timeout=config.averaging.request_timeout,
                                          steps=lambda: self.host.stats.steps, access=swarm.access)
        status.update(phase="loading trunk", role="trunk", initial_trunk_norm=parameter_norm(self.trunk),
                      loaded_trunk=False)

    def run(self) -> None:
        dht, run_id = self.swarm.dht, self.config.run_id
        # a late host starts from the swarm's trunk, not the seeded initial one: averaging the initial
        # trunk in with full weight would pull the trained trunk back
        others = find_trunks(dht, run_id, exclude=dht.peer_id)
        if others:
            self.status.write(self.options.status_file)
            logger.info(f"{len(others)} other trunk host(s) announced: loading the current trunk first")
            if self.averager.load_from_peers():
                self.status.update(loaded_trunk=True, loaded_trunk_norm=parameter_norm(self.trunk))
        self.averager.start()
        self.status.phase = "hosting trunk"
        run_in_loop_thread(self._serve, threading.Event(), "trunk-host")

    async def _serve(self, stop: threading.Event) -> None:
        dht, run_id = self.swarm.dht, self.config.run_id
        await self.host.start(await dht.replicate_p2p())
        logger.info(f"hosting the trunk of split run {run_id!r} as {dht.peer_id}")
        last_announce = last_status = last_lookup = float("-inf")
        started, pending = time.monotonic(), None
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now - last_announce > ANNOUNCE_PERIOD:
                    pending = announce_trunk(dht, run_id, self.swarm.signature_validator)  # keep it until done
                    last_announce = now
                if now - last_lookup > (ANNOUNCE_PERIOD if self.averager.others_present else 2.0):
                    # blocking, but short (mostly the local DHT node) and rare
                    self.averager.others_present = bool(find_trunks(dht, run_id, exclude=dht.peer_id))
                    last_lookup = now
                if now - last_status > 1.0:
                    self._report(now - started)
                    last_status = now
                await asyncio.sleep(0.1)
        finally:
            await self.host.stop()
            del pending

    def _report(self, elapsed: float) -> None:
        stats, averager = self.host.stats, self.averager
        self.status.update(step=stats.steps, samples=stats.samples, rejected=stats.rejected,
                           unauthorized=stats.unauthorized, loss=stats.last_loss,
                           rounds=[asdict(r) for r in averager.rounds], trunk_norm=parameter_norm(self.trunk),
                           sharing_trunk=averager.sharing, samples_per_second=stats.samples / max(elapsed, 1e-6))
        self.status.write(self.options.status_file)
        self.reporter.maybe_publish(step=stats.steps, epoch=len(averager.rounds), loss=stats.last_loss,
                                    samples_per_second=self.status.samples_per_second,
                                    samples_accumulated=stats.samples, rounds=averager.rounds)

    def close(self) -> None:
        stats = self.host.stats
        rounds = self.averager.rounds if self.averager is not None else []
        self.status.update(step=stats.steps, rejected=stats.rejected, unauthorized=stats.unauthorized,
                           rounds=[asdict(r) for r in rounds], trunk_norm=parameter_norm(self.trunk))
        super().close()
        if self.averager is not None:
            self.averager.shutdown()
