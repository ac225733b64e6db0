"""Split runs through the swarm: `swarmtrain peer --role trunk` and `swarmtrain peer --role data-owner`.

A run whose config has a `privacy.split` section is a split run (the digits split task of
swarmtrain.privacy.digits):

- trunk peers (`--role trunk`, or the default role on a split run) join like any peer, host the
  layers after the cut with split.TrunkHost on their DHT's P2P daemon, and announce their peer ID
  under the DHT key f"{run_id}_trunks" (subkey: their own public key, so the record is signed and
  nobody can overwrite another host's). When there are other trunk hosts, every
  `privacy.split.average_every` seconds they average the trunk's parameters with
  hivemind.averaging.DecentralizedAverager (prefix f"{run_id}_trunk"); updates made by data owners
  while a round runs are kept (new = current + (average - snapshot)).
  A trunk host that finds other trunk hosts announced when it starts first downloads the current
  trunk from one of them (the averager's state sharing), checks it (shapes, finite values), and only
  then serves and averages; if no host sends one, it says so in one line and starts from the
  seeded initial trunk. A host shares its trunk only once it has trained, loaded or averaged away
  from the initial weights, so a newcomer never receives the initial weights from another newcomer.
- data owners (`--role data-owner`) join the DHT, find a trunk host from the announcements, and
  train their bottom layers plus the privacy head through it with split.DataOwnerClient: only Z
  (float32 [batch, cut_width]) and the labels leave the machine. They print progress, and at the
  end the held-out accuracy and the leakage (dCor between X and Z).

On a token-gated run (access.mode: token) every node publishes its token, the trunk averager is an
AccessGuardedAverager (swarmtrain.access: averaging and state downloads refused to callers without a
valid token), and the trunk's own RPCs ask the same check before they look at a request.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarmtrain.access import AccessGuardedAverager, LocalAccess, access_record_key, active_access, guarded_class
from swarmtrain.errors import UserError

from .config import PrivacyConfig, SplitConfig
from .digits import NUM_CLASSES, NUM_FEATURES, DigitsNet, load_digits_splits
from .head import PrivacyHead
from .split import DataOwnerClient, TrunkHost

logger = logging.getLogger("swarmtrain.split")

ANNOUNCE_TTL = 45.0        # a trunk host's announcement expires this long after its last refresh
ANNOUNCE_PERIOD = 10.0
OWNER_BOTTOM_CUT = "3"     # in DigitsNet.features (the bottom): the second ReLU, whose output is Z
SWITCH_AFTER_DROPS = 3     # a data owner looks for another trunk host after this many failed steps in a row
TRUNK_STATE_FORMAT = "swarmtrain.split.trunk/1"  # marks a downloaded trunk state (metadata["format"])
LOAD_ATTEMPTS = 3          # a late trunk host tries this many times to download the current trunk...
LOAD_RETRY_DELAY = 3.0     # ...this many seconds apart (a host that has just trained may not have declared yet)


def trunks_key(run_id: str) -> str:
    return f"{run_id}_trunks"


def split_models(split: SplitConfig, seed: int) -> DigitsNet:
    torch.manual_seed(seed)  # every trunk host starts from the same trunk, so averaging starts aligned
    return DigitsNet(hidden=split.hidden, cut_width=split.cut_width, trunk_hidden=split.trunk_hidden)


def _split_of(config, role: str) -> SplitConfig:
    if config.privacy.split is None:
        raise UserError(f"--role {role}: run {config.run_id!r} is not a split run (its config has no privacy.split "
                        "section); join it without --role")
    return config.privacy.split


def _run_in_loop_thread(make_coroutine, stop: threading.Event, name: str):
    """Run make_coroutine(stop) with asyncio.run in a thread; the main thread waits for it.

    A stop signal raises StopRequested in the main thread (here, while it waits) and never inside the
    event loop: raised there, it leaves the P2P's tasks half-cancelled and asyncio.run never returns.
    We set `stop`, let the coroutine finish its step and clean up, and re-raise.
    """
    outcome: Dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = asyncio.run(make_coroutine(stop))
        except BaseException as error:  # handed to the main thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        thread.join(10.0)  # a daemon thread: if its cleanup hangs, the process still exits
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


@dataclass
class AveragingRound:
    """What PeerReporter / the status file expect of a round (ok, seconds, group_size, epoch, note)."""

    epoch: int
    group_size: int
    ok: bool
    seconds: float
    note: str = ""


# ------------------------------------------------------------------------------------------------
# Trunk host
# ------------------------------------------------------------------------------------------------
class _LockedTrunkHost(TrunkHost):
    """TrunkHost whose steps hold a thread lock, so the averaging thread never sees half a step."""

    def __init__(self, *args, params_lock: threading.Lock, **kwargs):
        super().__init__(*args, **kwargs)
        self.params_lock = params_lock

    def _train_step(self, z, y):
        with self.params_lock:
            return super()._train_step(z, y)

    def _evaluate(self, z):
        with self.params_lock:
            return super()._evaluate(z)


def _norm(module: torch.nn.Module) -> float:
    """L2 norm of all parameters: shows in the status file whether a trunk moved (by steps or averaging)."""
    with torch.no_grad():
        return float(torch.sqrt(sum((p.double() ** 2).sum() for p in module.parameters())))


def announce_trunk(dht, run_id: str, signer: RSASignatureValidator):
    value = {"peer_id": dht.peer_id.to_base58(), "time": time.time()}
    return dht.store(trunks_key(run_id), subkey=signer.local_public_key, value=value,
                     expiration_time=get_dht_time() + ANNOUNCE_TTL, return_future=True)


def find_trunks(dht, run_id: str, exclude: Optional[PeerID] = None) -> List[PeerID]:
    """Peer IDs of the trunk hosts announced for the run (fresh, well-formed, signed subkeys only)."""
    found = dht.get(trunks_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    result = []
    for subkey, entry in found.value.items():
        if not isinstance(subkey, bytes) or RSASignatureValidator._PUBLIC_KEY_RE.search(subkey) is None:
            continue  # an unsigned subkey: anyone could have written it
        value = entry.value
        if not isinstance(value, dict) or not isinstance(value.get("peer_id"), str):
            continue
        if not isinstance(value.get("time"), (int, float)) or time.time() - value["time"] > ANNOUNCE_TTL:
            continue
        try:
            peer_id = PeerID.from_base58(value["peer_id"])
        except Exception:
            continue
        if peer_id != exclude and peer_id not in result:
            result.append(peer_id)
    return result


class _AccessGate(AccessGuardedAverager):
    """The averagers' token check (swarmtrain.access.AccessGuardedAverager), for the trunk's own RPCs.

    The same table of tokens published under f"{run_id}_access", refreshed the same way, with the same
    refusal log line; creating it also keeps this node's own token published (data owners need that
    for the trunk hosts to accept their calls). Its check runs in the event loop that serves the RPCs.
    """

    def __init__(self, dht, access: LocalAccess, run_id: str):
        self.dht = dht  # what the mixin reads the tokens with and publishes ours through
        super().__init__(access=access, access_key=access_record_key(run_id))  # next in the MRO: object

    async def allows(self, peer_id: PeerID, what: str) -> bool:
        return await self._access_allows(peer_id, what)

    def shutdown(self) -> None:  # no averager behind it: only stop publishing
        if self._access_publisher is not None:
            self._access_publisher.release()
            self._access_publisher = None


def _access_gate(dht, config) -> Optional[_AccessGate]:
    """The token check of a token-gated run (None on an open run)."""
    access = active_access()
    if config.access.mode != "token":
        return None
    if access is None:  # normally unreachable: without a token the swarm's DHT would not have let us in
        raise UserError(f"run {config.run_id!r} is token-gated: join with --token (ask the organiser for one)")
    return _AccessGate(dht, access, config.run_id)


class TrunkStateAverager(DecentralizedAverager):
    """The trunk hosts' averager. A newcomer's load_state_from_peers downloads the *live* trunk (copied
    under the params lock), not the averaging buffer, which is only filled at each round."""

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
    more than the initial weights."""

    def __init__(self, trunk: torch.nn.Module, dht, run_id: str, split: SplitConfig, params_lock: threading.Lock,
                 *, client_mode: bool, matchmaking_time: float, request_timeout: float,
                 steps: Callable[[], int] = lambda: 0):
        self.trunk, self.dht, self.run_id, self.split, self.lock = trunk, dht, run_id, split, params_lock
        self.steps = steps  # optimizer steps this host took on the trunk
        self.rounds: List[AveragingRound] = []
        # set by the serving loop from the DHT's announcements (this thread makes no DHT calls: the
        # DHT's pipe to its process is not meant for concurrent senders)
        self.others_present = False
        self.loaded = False  # the trunk came from another host (load_from_peers)
        self.averaged_away = False  # an averaging round moved the trunk off the initial weights
        with torch.no_grad():
            self.initial = [p.detach().clone() for p in trunk.parameters()]
        access = active_access()
        averager_class, guard = TrunkStateAverager, {}
        if access is not None:  # a token-gated run: the same guard as the training averagers
            averager_class = guarded_class(TrunkStateAverager)
            guard = dict(access=access, access_key=access_record_key(run_id))
        self.averager = averager_class(
            [p.detach().clone() for p in trunk.parameters()], dht, prefix=f"{run_id}_trunk", start=True,
            client_mode=client_mode, min_matchmaking_time=matchmaking_time, request_timeout=request_timeout,
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

    def average_once(self) -> AveragingRound:
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
        record = AveragingRound(epoch=len(self.rounds), group_size=len(gathered) if ok else 0, ok=ok,
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


def serve_trunk(dht, config, signer: RSASignatureValidator, options, status: dict, *, client_mode: bool) -> dict:
    """`swarmtrain peer --role trunk`: host the trunk until stopped; returns the final status."""
    from swarmtrain.peer.reporting import PeerReporter
    from swarmtrain.peer.trainer import _write_status
    from swarmtrain.signals import children_ignore_interrupts

    split = _split_of(config, "trunk")
    if client_mode:
        raise UserError("a trunk host must accept incoming connections (data owners call it): it cannot run in "
                        "client mode; forward a port (--port, --public-ip) or join as a data owner")
    trunk = split_models(split, config.seed).classifier
    lock = threading.Lock()
    gate = _access_gate(dht, config)
    host = _LockedTrunkHost(trunk, torch.optim.Adam(trunk.parameters(), lr=split.lr),
                            activation_shape=(split.cut_width,), num_classes=NUM_CLASSES, run_id=config.run_id,
                            max_batch_size=max(1024, split.batch_size), params_lock=lock,
                            authorize=gate.allows if gate is not None else None)
    with children_ignore_interrupts():
        averager = TrunkAverager(trunk, dht, config.run_id, split, lock, client_mode=client_mode,
                                 matchmaking_time=config.averaging.matchmaking_time,
                                 request_timeout=config.averaging.request_timeout, steps=lambda: host.stats.steps)
    reporter = PeerReporter(dht, config.run_id, signer, role="trunk", device="cpu", client_mode=client_mode,
                            metrics_port=options.metrics_port)
    status.update(phase="loading trunk", role="trunk", initial_trunk_norm=_norm(trunk), loaded_trunk=False)

    async def serve(stop: threading.Event) -> None:
        p2p = await dht.replicate_p2p()
        await host.start(p2p)
        logger.info(f"hosting the trunk of split run {config.run_id!r} as {dht.peer_id}")
        last_announce = last_status = last_lookup = float("-inf")
        started, pending = time.monotonic(), None
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now - last_announce > ANNOUNCE_PERIOD:
                    pending = announce_trunk(dht, config.run_id, signer)  # keep the future until it is done
                    last_announce = now
                if now - last_lookup > (ANNOUNCE_PERIOD if averager.others_present else 2.0):
                    # blocking, but short (mostly the local DHT node) and rare
                    averager.others_present = bool(find_trunks(dht, config.run_id, exclude=dht.peer_id))
                    last_lookup = now
                if now - last_status > 1.0:
                    stats = host.stats
                    status.update(step=stats.steps, samples=stats.samples, rejected=stats.rejected,
                                  unauthorized=stats.unauthorized, loss=stats.last_loss,
                                  rounds=[vars(r) for r in averager.rounds], trunk_norm=_norm(trunk),
                                  sharing_trunk=averager.sharing,
                                  samples_per_second=stats.samples / max(now - started, 1e-6))
                    _write_status(options.status_file, status)
                    reporter.maybe_publish(step=stats.steps, epoch=len(averager.rounds), loss=stats.last_loss,
                                           samples_per_second=status["samples_per_second"],
                                           samples_accumulated=stats.samples, rounds=averager.rounds)
                    last_status = now
                await asyncio.sleep(0.1)
        finally:
            await host.stop()
            del pending

    try:
        # a late host starts from the swarm's trunk, not the seeded initial one: averaging the initial
        # trunk in with full weight would pull the trained trunk back
        others = find_trunks(dht, config.run_id, exclude=dht.peer_id)
        if others:
            _write_status(options.status_file, status)
            logger.info(f"{len(others)} other trunk host(s) announced: loading the current trunk first")
            if averager.load_from_peers():
                status.update(loaded_trunk=True, loaded_trunk_norm=_norm(trunk))
        averager.start()
        status["phase"] = "hosting trunk"
        _run_in_loop_thread(serve, threading.Event(), "trunk-host")
    except KeyboardInterrupt:
        status["phase"] = "stopped"
        raise
    finally:
        status.update(step=host.stats.steps, rejected=host.stats.rejected, unauthorized=host.stats.unauthorized,
                      rounds=[vars(r) for r in averager.rounds], trunk_norm=_norm(trunk))
        _write_status(options.status_file, status)
        reporter.close()
        averager.shutdown()
        if gate is not None:
            gate.shutdown()
    status["phase"] = "finished"
    return status


# ------------------------------------------------------------------------------------------------
# Data owner
# ------------------------------------------------------------------------------------------------
def load_owner_data(path: Optional[str], seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(train_x, train_y, test_x, test_y, description): the embedded digits, or an .npz with x and y."""
    if path is None:
        splits = load_digits_splits(seed=seed)
        return (splits.private_x, splits.private_y, splits.test_x, splits.test_y,
                f"sklearn digits (embedded): {len(splits.private_x)} training, {len(splits.test_x)} held-out samples")
    if not str(path).endswith(".npz"):
        raise UserError(f"--data-owner-data {path}: expected an .npz file with arrays x [N, {NUM_FEATURES}] "
                        f"(floats, e.g. pixels in [0, 1]) and y [N] (class ids 0-{NUM_CLASSES - 1})")
    try:
        with np.load(Path(path)) as archive:
            x, y = np.asarray(archive["x"], dtype=np.float32), np.asarray(archive["y"])
    except KeyError as missing:
        raise UserError(f"--data-owner-data {path}: the archive has no array {missing}; it needs x and y") from None
    except (OSError, ValueError) as error:
        raise UserError(f"--data-owner-data {path}: cannot read it ({error})") from None
    x = x.reshape(len(x), -1)
    if x.shape[1] != NUM_FEATURES or y.shape != (len(x),) or len(x) < 10:
        raise UserError(f"--data-owner-data {path}: x must be [N, {NUM_FEATURES}] and y [N] with N >= 10; got "
                        f"x {list(x.shape)}, y {list(y.shape)}")
    if not np.isfinite(x).all() or y.min() < 0 or y.max() >= NUM_CLASSES or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"--data-owner-data {path}: x must be finite and y integer class ids in [0, {NUM_CLASSES})")
    order = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, len(x) // 5)
    xt, yt = torch.from_numpy(x[order]), torch.from_numpy(y[order].astype(np.int64))
    return xt[cut:], yt[cut:], xt[:cut], yt[:cut], f"{path}: {len(x) - cut} training, {cut} held-out samples"


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
    batch_size = min(batch_size, len(x))
    while True:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


def run_data_owner_peer(dht, config, signer: RSASignatureValidator, options, status: dict, *,
                        client_mode: bool) -> dict:
    """`swarmtrain peer --role data-owner`: train through a trunk host until max_steps or a stop."""
    from swarmtrain.peer.reporting import PeerReporter
    from swarmtrain.peer.trainer import _write_status

    split = _split_of(config, "data-owner")
    train_x, train_y, test_x, test_y, description = load_owner_data(options.data_owner_data, config.seed)
    logger.info(f"data (never leaves this machine): {description}")
    bottom = split_models(split, config.seed).features
    alpha = config.privacy.alpha if config.privacy.enabled else 0.0  # alpha 0: leakage is measured, not penalised
    head = PrivacyHead(bottom, PrivacyConfig(enabled=True, cut_layer=OWNER_BOTTOM_CUT, alpha=alpha,
                                             leakage_statistic=config.privacy.leakage_statistic))
    optimizer = torch.optim.Adam(bottom.parameters(), lr=split.lr)
    gate = _access_gate(dht, config)  # token-gated run: publishes our token, which the trunk hosts check
    reporter = PeerReporter(dht, config.run_id, signer, role="data-owner", device="cpu", client_mode=client_mode,
                            metrics_port=options.metrics_port)
    batches = _batches(train_x, train_y, split.batch_size, torch.Generator().manual_seed(config.seed))
    status.update(phase="finding a trunk host", role="data-owner")
    _write_status(options.status_file, status)

    class _Stopped(Exception):
        pass

    async def find_trunk(stop: threading.Event, exclude: Optional[PeerID] = None, timeout: float = 60.0) -> PeerID:
        deadline = time.monotonic() + timeout
        while True:
            if stop.is_set():
                raise _Stopped()
            trunks = await asyncio.get_running_loop().run_in_executor(None, find_trunks, dht, config.run_id)
            choices = [t for t in trunks if t != exclude] or trunks
            if choices:
                return random.choice(choices)
            if time.monotonic() > deadline:
                raise UserError(f"no trunk host of run {config.run_id!r} announced itself in {timeout:.0f}s: a split "
                                "run needs at least one peer with --role trunk")
            await asyncio.sleep(1.0)

    async def train(stop: threading.Event) -> None:
        p2p = await dht.replicate_p2p()
        trunk = await find_trunk(stop)
        logger.info(f"training through trunk host {trunk}")
        client = DataOwnerClient(p2p, trunk, bottom, head, optimizer, run_id=config.run_id, num_classes=NUM_CLASSES)
        status.update(phase="training", trunk=trunk.to_base58())
        drops_in_a_row, started, last_log = 0, time.monotonic(), float("-inf")
        while options.max_steps is None or client.stats.steps < options.max_steps:
            if stop.is_set():
                return  # run_peer reports the stop; no final evaluation on Ctrl+C
            x, y = next(batches)
            result = await client.train_step(x, y)
            if not result.applied:
                drops_in_a_row += 1
                if drops_in_a_row >= SWITCH_AFTER_DROPS:
                    client.trunk_peer_id = await find_trunk(stop, exclude=client.trunk_peer_id)
                    logger.warning(f"switching to trunk host {client.trunk_peer_id}")
                    status["trunk"], drops_in_a_row = client.trunk_peer_id.to_base58(), 0
                else:
                    await asyncio.sleep(0.5)
                continue
            drops_in_a_row = 0
            now = time.monotonic()
            status.update(step=client.stats.steps, loss=result.loss, batch_accuracy=result.batch_accuracy,
                          leakage=result.leakage, dropped=client.stats.dropped, bytes_sent=client.stats.bytes_sent,
                          samples_per_second=client.stats.steps * len(y) / max(now - started, 1e-6))
            if now - last_log > 5.0:
                logger.info(f"step {client.stats.steps}: loss {result.loss:.3f}, batch accuracy "
                            f"{result.batch_accuracy:.2f}, leakage dCor {result.leakage:.3f}")
                _write_status(options.status_file, status)
                reporter.maybe_publish(step=client.stats.steps, epoch=0, loss=result.loss,
                                       samples_per_second=status["samples_per_second"],
                                       samples_accumulated=client.stats.steps * len(y), rounds=[],
                                       leakage=result.leakage)
                last_log = now
        accuracy = await client.evaluate(test_x, test_y)
        with torch.no_grad():  # leakage of the final bottom on held-out data
            bottom.eval()
            bottom(test_x)
            leakage = head.measure()
        status.update(test_accuracy=accuracy, test_leakage=leakage, step=client.stats.steps,
                      dropped=client.stats.dropped, bytes_sent=client.stats.bytes_sent)
        logger.info(f"data owner done: {client.stats.steps} steps, held-out accuracy {accuracy:.3f} on "
                    f"{len(test_x)} samples, leakage dCor(X, Z) {leakage:.3f}, {client.stats.dropped} step(s) dropped, "
                    f"{client.stats.bytes_sent / 1e6:.1f} MB of Z and labels sent")

    try:
        try:
            _run_in_loop_thread(train, threading.Event(), "data-owner")
        except _Stopped:
            pass  # the stop signal came while looking for a trunk host: KeyboardInterrupt follows
        status["phase"] = "finished"
    except KeyboardInterrupt:
        status["phase"] = "stopped"
        raise
    finally:
        _write_status(options.status_file, status)
        reporter.close()
        if gate is not None:
            gate.shutdown()
    return status
