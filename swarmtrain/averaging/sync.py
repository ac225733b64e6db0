"""``averaging.mode: sync`` (DeDLOC): hivemind.Optimizer configured from the run config, with a record of
every averaging round, parameter fingerprints gathered in each round, and a safer state download.

With ``averaging.overlap`` the optimizer runs hivemind's delayed parameter updates (the "Training
Transformers Together" recipe): at an epoch's end the peer starts the gradient round and goes straight
on computing the next epoch's gradients; the round and the optimizer step run in a background thread,
and their result reaches the model at a later local step, one epoch late. The next round's matchmaking
may then start while the last round still runs, so what changes here:
- the next round's matchmaking starts (hivemind's pre-scheduling, before the epoch's expected end)
  once the last round has its group, so that matchmaking, most of a round's time on a fast link,
  hides behind computation too. Two steps in one hivemind averager are not safe as they come:
  they share the flag that tells an arriving part to wait for its group's registration (parts were
  refused and rounds failed, seen on loopback), which GroupRegistrationMixin replaces with a wait for
  the group itself; and a failed round is not retried (its retry would look for a group beside the
  next round and could meet other peers' rounds of the other epoch): it falls back to local
  gradients and the peer re-synchronises;
- the fingerprint gathered in round k is of the parameters after round k-2 (noted when round k-1
  began), the same for every member in step whenever it schedules round k;
- round records are written by the background thread, with the epoch the round was for;
- a state donor asked while a round runs from its parameters waits for that round to land, so that a
  joiner's first round is the donor's next (SettledStateMixin)."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import time
import weakref
from concurrent.futures import InvalidStateError
from typing import AsyncIterator, Callable, List, Optional, Tuple

import hivemind
import torch
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, anext, as_aiter

from swarmtrain import hivemind_compat
from swarmtrain.access.guard import with_access_guard
from swarmtrain.averaging.progress import SwarmProgressTracker
from swarmtrain.averaging.rounds import NO_OTHER_PEERS, RoundRecord, describe_round_failure, group_id
from swarmtrain.compression.factory import with_mixin
from swarmtrain.compression.stats import AveragingTraffic
from swarmtrain.signals import poll, raise_if_stop_requested
from swarmtrain.training.fingerprint import fingerprint, fingerprint_positions, fingerprints_match

logger = logging.getLogger("swarmtrain.peer")
FINGERPRINT_SIZE = 64  # parameter values gathered from every member in each round
FINGERPRINT_SEED = 0


UNANSWERED_DOWNLOADS_BEFORE_GIVING_UP = 3  # attempts in a row in which no donor served a state
GROUP_REGISTRATION_WAIT = 30.0  # seconds a part may wait for its group to start here (senders time out sooner)
SETTLE_POLL_SECONDS = 0.05  # a donor waiting for its round to land re-checks this often


def update_pending(state_averager: TrainingStateAverager) -> bool:
    """With delayed updates: a round or optimizer step of this state averager still runs in the background."""
    return any(not update.done() for update in list(state_averager.pending_updates))


class GroupRegistrationMixin:
    """Put in front of a gradient averager whose next round may look for a group while the last runs.

    A part that arrives before its group has started here (a groupmate triggered first) waits in
    hivemind for an event that any of the averager's steps may set: with two steps, a part of round
    k found the event set by round k+1's matchmaking, its group not there, and was refused. Here it
    waits for its own group to appear, up to GROUP_REGISTRATION_WAIT."""

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        request = await anext(stream)
        deadline = asyncio.get_running_loop().time() + GROUP_REGISTRATION_WAIT
        while (not hivemind_compat.group_registered(self, request.group_id)
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(0.01)
        async for message in super().rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message


class SettledStateMixin:
    """Put in front of hivemind's TrainingStateAverager: a state it serves to a joiner is never torn,
    never labelled one epoch ahead of its parameters, and (with delayed updates) the starting point of
    a round the joiner can still join.

    With delayed updates hivemind counts the new epoch E as soon as round E-1 begins, while that
    round and its optimizer step run in the background for a second or more. Served then, the
    parameters before round E-1's update were labelled E: the joiner stayed one step apart. Labelled
    E-1 they were no better: round E-1 had begun without the joiner, whose first round was then the
    swarm's round E, so it never had round E-1's update and was one step apart all the same (the
    joiners of the overlap test resynchronised once, 2 runs in 3 on loopback). So a donor asked while a round
    runs from its parameters -- in flight, or scheduled with its group forming -- first waits for it
    to land, up to ``settle_wait`` seconds (set by the optimizer), and serves the parameters after
    it, labelled E: the joiner's first round is round E, as the donor's next. Only a round in flight
    that does not land in time gives the old E-1 label (the joiner, wanting E, asks again a moment
    later). The state is read between optimizer steps."""

    settle_wait: float = 0.0
    round_forming: Optional[Callable[[], bool]] = None  # the optimizer's: a round is scheduled, not yet landed

    def get_current_state(self):
        deadline = time.monotonic() + self.settle_wait
        while True:
            with self.lock_optimizer:  # not half-way through an optimizer step
                in_flight = update_pending(self)
                forming = self.round_forming is not None and self.round_forming()
                if not (in_flight or forming) or time.monotonic() >= deadline:
                    metadata, tensors, infos = super().get_current_state()
                    break
            time.sleep(SETTLE_POLL_SECONDS)
        if in_flight and isinstance(metadata.get("epoch"), int):
            metadata["epoch"] = max(0, metadata["epoch"] - 1)
        return metadata, tensors, infos


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that remembers how each gradient averaging round went.

    hivemind only logs the group size; the progress display, the demo summary and the tests need
    it as data. The override wraps the one method that sees the round's outcome (hivemind is
    pinned, and every private method overridden here is listed in swarmtrain.hivemind_compat).
    With hivemind's ``delay_grad_averaging`` (``averaging.overlap``) rounds run in the background:
    see the module docstring.

    :param fingerprint_tolerance: peers whose fingerprints differ by more than this hold different
      parameters (about a learning rate: a stale step moves parameters by that much)
    :param access: on a token-gated run, this node's LocalAccess: the state averager refuses state
      downloads from peers without a valid token (the gradient averager's factory is guarded by its
      maker); None on an open run
    :param args, kwargs: hivemind.Optimizer's
    """

    # what _make_state_averager builds (local mode: its own); the name stays hivemind's, for its RPCs
    state_averager_class = with_mixin(SettledStateMixin, with_mixin(hivemind_compat.CleanShutdownMixin,
                                                                    TrainingStateAverager))

    def __init__(self, *args, fingerprint_tolerance: float = 1e-4, access=None, **kwargs):
        self.access = access  # before super().__init__: it builds the state averager
        self.rounds: List[RoundRecord] = []
        self.diverged = False  # set when the last round showed our parameters differ from the group's
        self.fingerprint_tolerance = fingerprint_tolerance
        self._fingerprint_cooldown = 0
        self._synced_epochs = 0  # epochs stepped with the swarm since we last took state from a peer
        self._round_epochs = weakref.WeakKeyDictionary()  # a begun round's control -> the epoch it is for
        self._round_began = False
        self.overlapped_steps = 0  # local steps taken while a round or step was in flight (overlap)
        super().__init__(*args, **kwargs)
        self._fingerprint_positions = self._choose_fingerprint_positions()
        if self.delay_optimizer_step and self.grad_averager is not None:  # see SettledStateMixin
            self.state_averager.settle_wait = self._landing_patience
            self.state_averager.round_forming = self._round_forming
        # delayed updates: (epoch, fingerprint) of the parameters at the start of the last epoch whose
        # round has begun (every earlier round applied): what rounds gather and the status file shows
        self._settled_fingerprint: Optional[Tuple[int, List[float]]] = (self.local_epoch, self.parameter_fingerprint())
        # every gradient round also gathers each member's parameter fingerprint (a few hundred bytes),
        # so a peer that drifted -- it stepped alone before the others found it, its group split, or
        # its state download was one step stale -- learns it from the very next round instead of
        # training on apart for ever
        schedule_step = self.grad_averager.schedule_step if self.grad_averager is not None else None  # None: mode local

        def schedule_step_with_fingerprint(*args, **kwargs):
            kwargs.setdefault("gather", [self.local_epoch, self._gathered_fingerprint(), self._synced_epochs])
            if self.delay_grad_averaging:
                kwargs.setdefault("allow_retries", False)  # see the module docstring
            return schedule_step(*args, **kwargs)

        if schedule_step is not None:
            self.grad_averager.schedule_step = schedule_step_with_fingerprint

    def _optimized_parameters(self) -> List[torch.Tensor]:
        return [p for group in self.state_averager.optimizer.param_groups for p in group["params"]]

    @property
    def _landing_patience(self) -> float:
        """Seconds a round takes to land, at most (a few matchmaking windows and chunk timeouts)."""
        return min(self.averaging_timeout or 30.0, 3 * (self.matchmaking_time + (self.next_chunk_timeout or 0.0)))

    def _round_forming(self) -> bool:
        scheduled = self.scheduled_grads
        return scheduled is not None and not scheduled.done()

    def _choose_fingerprint_positions(self) -> List[tuple]:
        sizes = [p.numel() for p in self._optimized_parameters()]
        return fingerprint_positions(sizes, FINGERPRINT_SIZE, FINGERPRINT_SEED)

    def parameter_fingerprint(self) -> List[float]:
        """The parameters' values at fixed pseudo-random positions (swarmtrain.training.fingerprint)."""
        return fingerprint(self._optimized_parameters(), self._fingerprint_positions)

    def _gathered_fingerprint(self) -> List[float]:
        """What this peer tells its group it holds. Without delayed updates: its parameters now (every
        member applied the same rounds). With them: the parameters it held when its last round began
        (see the module docstring); none (an empty list, left out of the comparison) until a round
        has begun since the last state download."""
        if not self.delay_optimizer_step:
            return self.parameter_fingerprint()
        return list(self._settled_fingerprint[1]) if self._settled_fingerprint is not None else []

    def epoch_start_fingerprint(self) -> Optional[Tuple[int, List[float]]]:
        """(epoch, fingerprint of the parameters at that epoch's start) for the newest epoch whose
        starting parameters are settled: the current one, or with delayed updates (the last round
        still in flight) the previous one; None right after a state download."""
        if not self.delay_optimizer_step:
            return self.local_epoch, self.parameter_fingerprint()
        return self._settled_fingerprint

    def settle(self, timeout: Optional[float] = None) -> None:
        """With delayed updates: wait (up to `timeout` seconds; None: the averaging timeout) for the
        round and optimizer step in flight, and apply their result to the model. Before the model is
        saved, evaluated or compared; a no-op otherwise."""
        if not self.delay_optimizer_step:
            return
        if timeout is None:
            timeout = self.averaging_timeout or 30.0
        deadline = time.monotonic() + timeout  # 0: only what has already landed
        for update in list(self.state_averager.pending_updates):
            try:
                update.result(max(0.0, deadline - time.monotonic()))
            except BaseException as error:  # a failed update is logged by hivemind; keep what we have
                logger.debug(f"delayed update: {error!r}")
        self.state_averager.step(wait_for_delayed_updates=False)  # applies what finished

    @contextlib.contextmanager
    def no_step_running(self):
        """Inside this block no optimizer step runs (with delayed updates, one in flight waits at its
        start or has finished; hivemind holds the same lock for its step, not for its round): the
        optimizer's state read here is whole, for a checkpoint taken without waiting for the round."""
        with self.state_averager.lock_optimizer:
            yield

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
            wanted, attempt, unanswered = self._epoch_to_download(), 0, 0
            while True:
                attempt += 1
                wanted = self._servable_epoch(wanted)
                # (a donor's declaration outlives it by up to hivemind's declare period: the peers of
                # a swarm that just stopped kept a lone peer asking them for the whole state wait)
                unanswered = 0 if self._download_state_once(own_state, **kwargs) else unanswered + 1
                finite = self.state_is_finite()
                if not finite:
                    logger.warning("a peer served a state with non-finite values; asking another")
                    self._restore_state(own_state)
                if finite and self._download_satisfies(wanted) or time.monotonic() > deadline:
                    break
                if unanswered >= UNANSWERED_DOWNLOADS_BEFORE_GIVING_UP:
                    break
                raise_if_stop_requested()
                time.sleep(min(1.0 + 0.5 * attempt, 5.0))  # the donors are applying epoch `wanted` right now
            loaded = self._download_satisfies(wanted)
            # from now on our own epoch is a vote for the swarm's (averaging.progress.credible_epoch):
            # we hold the swarm's state, or no donor could serve the epoch the records claimed
            self.tracker.votes_own_epoch = True
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
        self._settled_fingerprint = None  # the one from before the download describes other parameters
        return loaded

    def _download_satisfies(self, wanted: int) -> bool:
        """Whether the state we hold now is what a download of epoch `wanted` was for."""
        return self.local_epoch >= wanted

    def _epoch_to_download(self) -> int:
        """The swarm's epoch, but not above what another peer holds. Our own epoch is no vote while we
        re-synchronise: after a failed round we stepped alone, and that epoch is ours only. Waiting for
        a donor of it waited for a state nobody held -- two peers whose rounds failed at once each
        waited out the other's epoch in turn, for minutes (seen in the test suite twice)."""
        swarm_epoch, others = self.tracker.global_epoch, self.tracker.newest_other_epoch
        return swarm_epoch if others is None else min(swarm_epoch, others)

    def _servable_epoch(self, wanted: int) -> int:
        """`wanted`, but not above the newest epoch a donor now declares (other than us).

        The epoch wanted comes from progress records, which lag: a peer that stepped to epoch E+1 and
        then found itself apart downloads epoch E from us and declares E again, while its record still
        says E+1 until it next reports. Waiting for E+1 then waited out the whole state wait for a
        state nobody held, while that peer's rounds timed out without us (72 s, seen on loopback)."""
        if not self.use_gradient_averaging:
            return wanted  # mode local judges its downloads itself
        declared = self.dht.get(f"{self.state_averager.prefix}.all_averagers", latest=True)
        entries = declared.value if declared is not None and isinstance(declared.value, dict) else {}
        me = self.dht.peer_id.to_bytes()
        epochs = [entry.value for subkey, entry in entries.items()  # (anyone may write here: check what's read)
                  if subkey != me and isinstance(getattr(entry, "value", None), (int, float))
                  and math.isfinite(entry.value)]
        return min(wanted, int(max(epochs))) if epochs else wanted

    def _download_state_once(self, own_state: dict, **kwargs) -> bool:
        """One download from a random donor of the newest epoch; our epoch is then the state's.

        hivemind refuses a state whose epoch is below ours. In mode sync a peer re-synchronising
        already counts the swarm's epoch while its parameters are wrong, and a donor with a step in
        flight serves the epoch before (SettledStateMixin): refused, the download left us as we were
        while it looked like success. Here any donor's state is taken (the caller judges its epoch
        and asks again); when none answered, our own epoch stays. A donor that is itself downloading
        serves whatever its tensors hold at that moment, labelled -1 (this very trick): that state is
        nobody's, so we go back to `own_state`, the one we held before the download began.

        :returns: whether a donor's state was loaded (mode local: whether the download raised nothing)"""
        accept_any = self.use_gradient_averaging  # mode local judges its downloads itself
        if accept_any:
            self.state_averager.local_epoch = -1
        answered = False
        try:
            self.state_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
            answered = True
        except Exception as error:  # a donor vanished mid-download: ask another
            logger.warning(f"state download failed ({error!r}); trying another peer")
        finally:
            if accept_any and self.state_averager.local_epoch < 0:  # nothing loaded, or a state mid-download
                self._restore_state(own_state)
                self.state_averager.local_epoch = own_state["epoch"]
                answered = False
        return answered

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
            hivemind_compat.apply_optimizer_parameters(self.state_averager)  # the model's follow the optimizer's
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
        try:
            poll(lambda: True if control.done() else None, timeout=self.averaging_timeout or 30.0, interval=0.1)
        finally:
            if not control.done():
                try:
                    control.cancel()
                except InvalidStateError:
                    pass  # finished between the check and the cancel

    def shutdown(self):
        """hivemind's first waits for the delayed update in flight (overlap) as long as its round takes:
        up to the averaging timeout when a groupmate has just left, which kept a stopping peer for half a
        minute. The rounds in flight are cancelled first instead (hivemind's background step then falls
        back to local gradients at once); the checkpoint was written before, from settled parameters."""
        if self.delay_grad_averaging:
            for control in list(self._round_epochs.keys()):
                if not control.done():
                    try:
                        control.cancel()
                    except InvalidStateError:
                        pass  # finished between the check and the cancel
        super().shutdown()

    def _state_wait(self) -> float:
        # a donor is at most one averaging round away from serving the newest epoch
        return 2 * (self.averaging_timeout or 30.0) + 10.0

    @property
    def traffic(self) -> AveragingTraffic:
        """What the gradient averager measured (shared memory, written by its process): bytes sent
        and received from the serialized messages, the density sent, selection time..."""
        return self.grad_averager.stats.snapshot()

    def _make_state_averager(self, **kwargs):
        # hivemind's own arguments (hivemind_compat), with our class; on a token-gated run its
        # averaging RPCs (state downloads included) refuse peers without a valid access token
        averager_class = with_access_guard(self.state_averager_class, self.access)
        return averager_class(**hivemind_compat.state_averager_arguments(self), **kwargs)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> SwarmProgressTracker:
        return SwarmProgressTracker(
            dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size, client_mode=self.client_mode,
            status_loglevel=self.status_loglevel, start=True, **kwargs,
        )

    def _update_global_epoch(self, grad_scaler) -> None:
        epoch, settled = self.local_epoch, None
        self._round_began = False
        if self.delay_optimizer_step and self.grad_averager is not None:
            # hivemind waits for the update in flight first thing too; waiting here lets us note the
            # parameters this epoch started from, before this epoch's round can change them
            self.state_averager.step(wait_for_delayed_updates=True)
            settled = (epoch, self.parameter_fingerprint())
        super()._update_global_epoch(grad_scaler)
        if settled is not None:  # from the next round on (this one was scheduled with the previous)
            self._settled_fingerprint = settled
        if self.grad_averager is not None and not self._round_began:
            # hivemind stepped without a round: alone, or a round that never started
            alone = self.tracker.global_progress.num_peers <= 1
            self.rounds.append(RoundRecord(epoch, 0, False, 0.0, NO_OTHER_PEERS if alone else
                                           "no round started; stepped on local gradients"))

    def _maybe_schedule_gradient_averaging(self) -> None:
        """Not while the round in flight is still looking for its group (see the module docstring), and
        not while we see no other peer. hivemind pre-schedules a lone peer's round too, then cancels it at
        the epoch's end ("no other peers"). Two peers that start together each count only themselves
        for a while, yet find each other under the matchmaking key: the cancel then lands inside a join
        in progress, and hivemind's matchmaking can wait for ever for a follower that never leaves
        ("aclose(): asynchronous generator is already running"); every later round of that peer found
        no group. A peer that sees others at the epoch's end still starts its round then."""
        if self.tracker.global_progress.num_peers <= 1 and self.scheduled_grads is None:
            return
        if self.delay_grad_averaging and self.update_in_flight():
            self.overlapped_steps += 1  # hivemind calls this once per local step: one computed during a round
            in_flight = self.scheduled_grads
            if in_flight is not None and not (in_flight.began_allreduce or in_flight.done()):
                return
        super()._maybe_schedule_gradient_averaging()

    def update_in_flight(self) -> bool:
        """With delayed updates: a round or optimizer step still runs in the background."""
        return update_pending(self.state_averager)

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        epoch = self.local_epoch
        scheduled = self.scheduled_grads
        if scheduled is not None and (scheduled.triggered or scheduled.done()):
            # a round already used (with delayed updates: the last epoch's, when this one's was not
            # pre-scheduled), or matchmaking that gave up: hivemind would step on local gradients
            # instead of starting a round; start one
            self.scheduled_grads = None
        began = super()._begin_averaging_gradients(grad_scaler)
        if began:
            self._round_epochs[self.scheduled_grads] = epoch  # delayed: the epoch has moved on by the record
        self._round_began = began
        return began

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        # with delay_grad_averaging this runs in the state averager's background thread
        started = time.perf_counter()
        epoch = self._round_epochs.pop(maybe_step_control, None) if maybe_step_control is not None else None
        epoch = self.local_epoch if epoch is None else epoch
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
            self.rounds.append(RoundRecord(epoch, 0, False, seconds, describe_round_failure(error)))


def _is_fingerprint_record(data) -> bool:
    return (isinstance(data, (list, tuple)) and len(data) == 3 and isinstance(data[1], list)
            and len(data[1]) == FINGERPRINT_SIZE and isinstance(data[2], int))


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
