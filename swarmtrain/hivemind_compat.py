"""Everything of hivemind's inside that swarmtrain builds on, in one place.

swarmtrain extends hivemind 1.1.12 where it has no public seam: its averagers override methods that
hivemind calls on itself (``_aggregate_with_group``, ``_make_state_averager``, ...), and a few read
private attributes. None of that is a stable API, so it is listed here:

- ``OVERRIDDEN``: every hivemind method a swarmtrain class overrides (private or public), with the
  signature it was written against;
- small accessors for the private attributes swarmtrain reads or calls, so that a rename in hivemind
  breaks one function here instead of code spread over the package;
- :func:`state_averager_arguments`: the arguments hivemind.Optimizer gives its TrainingStateAverager.
  hivemind builds that averager inside ``_make_state_averager`` with the class hard-coded, so a
  subclass that needs another class (access-guarded, local-mode state) must repeat them: they are
  repeated once, here, and the source of hivemind's method is pinned.

``tests/test_hivemind_compat.py`` asserts the pinned version, every signature and that pinned
source, and that every hivemind method overridden anywhere in swarmtrain is listed: upgrading
hivemind starts with that test.
"""
from __future__ import annotations

from typing import Any, Dict

PINNED_VERSION = "1.1.12"


# every hivemind method a swarmtrain class overrides (private or public), by the hivemind class that
# defines it, with the signature it was written against (str(inspect.signature(...)) in hivemind 1.1.12).
# Averagers: the all-reduce (compression.averager, averaging.local), the round check and ban list
# (compression.crosscheck) and the access gate; the state
# averager: local mode's state (averaging.local); the dense all-reduce's runner and reducer: byte
# counting and the robust reducer; the optimizer: round records, fingerprints and local mode; the
# tracker: fewer progress reports and a quorum epoch; the DHT: its request loop (net.dht); a record
# validator: record lifetimes (monitoring.records); the authorizer: access tokens.
OVERRIDDEN = {
    "hivemind.averaging.averager:DecentralizedAverager": {
        "_aggregate_with_group": "(self, group_info: 'GroupInfo', min_vector_size: 'int', **kwargs) -> 'GatheredData'",
        "_run_allreduce_inplace_": "(self, tensors: 'Sequence[torch.Tensor]', group_info: 'GroupInfo', group_id: 'Optional[bytes]' = None, **kwargs)",
        # the round check: commits its seed into the gather before matchmaking (compression.crosscheck)
        "_step": "(self, *, step: 'StepControl', future_for_init: 'MPFuture')",
        "get_current_state": "(self) -> 'Tuple[Any, Sequence[torch.Tensor], Sequence[CompressionInfo]]'",
        "load_state_from_peers": "(self, wait: 'bool' = True, timeout: 'Optional[float]' = None) -> 'Optional[Tuple[Any, Sequence[torch.Tensor]]]'",
        "rpc_join_group": "(self, request: 'averaging_pb2.JoinRequest', context: 'P2PContext') -> 'AsyncIterator[averaging_pb2.MessageFromLeader]'",
        "rpc_aggregate_part": "(self, stream: 'AsyncIterator[averaging_pb2.AveragingData]', context: 'P2PContext') -> 'AsyncIterator[averaging_pb2.AveragingData]'",
        "rpc_download_state": "(self, _request: 'averaging_pb2.DownloadRequest', _context: 'P2PContext') -> 'AsyncIterator[averaging_pb2.DownloadData]'",
        "shutdown": "(self) -> 'None'",
        "_shutdown": "(self, timeout: 'Optional[float]') -> 'None'",
    },
    "hivemind.optim.state_averager:TrainingStateAverager": {
        "get_current_state": '(self)',
        "load_state_from_peers": '(self, **kwargs)',
    },
    "hivemind.averaging.allreduce:AllReduceRunner": {
        "_get_peer_stub": '(self, peer: hivemind.p2p.p2p_daemon_bindings.datastructures.PeerID) -> hivemind.p2p.servicer.StubBase',
        "rpc_aggregate_part": '(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: hivemind.p2p.p2p_daemon.P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]',
    },
    "hivemind.averaging.partition:TensorPartReducer": {
        "reset_accumulators": '(self)',
        "accumulate_part": '(self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0) -> torch.Tensor',
        "on_sender_failed": '(self, sender_index: int)',
        "check_current_part_finished": '(self)',
    },
    "hivemind.optim.optimizer:Optimizer": {
        "_make_state_averager": "(self, **kwargs) -> 'TrainingStateAverager'",
        "_make_progress_tracker": "(self, target_batch_size: 'int', **kwargs) -> 'ProgressTracker'",
        "_update_global_epoch": "(self, grad_scaler: 'Optional[GradScaler]') -> 'None'",
        "_average_gradients_and_load_into_optimizer": "(self, maybe_step_control: 'Optional[StepControl]')",
        "_begin_averaging_gradients": "(self, grad_scaler: 'Optional[GradScaler]') -> 'bool'",
        "_maybe_schedule_gradient_averaging": "(self) -> 'None'",
        "_should_load_state_from_peers": "(self) -> 'bool'",
        "_tag_along_with_zero_weight": "(self, control: 'StepControl')",
        "load_state_from_peers": '(self, **kwargs)',
        "step": "(self, closure: 'Optional[Callable[[], torch.Tensor]]' = None, batch_size: 'Optional[int]' = None, grad_scaler: 'Optional[GradScaler]' = None)",
        "shutdown": '(self)',
    },
    "hivemind.optim.progress_tracker:ProgressTracker": {
        "update_epoch": '(self, new_epoch: Optional[int] = None) -> int',
        "_parse_swarm_progress_data": '(self, metadata: hivemind.optim.progress_tracker.TrainingProgressSchema) -> hivemind.optim.progress_tracker.GlobalTrainingProgress',
        "shutdown": '(self, timeout: Optional[float] = None)',
    },
    "hivemind.optim.power_sgd_averager:PowerSGDGradientAverager": {
        "_aggregate_with_group": '(self, group_info: hivemind.averaging.group_info.GroupInfo, min_vector_size: int, **kwargs) -> Any',
    },
    "hivemind.dht.validation:RecordValidatorBase": {
        "validate": '(self, record: hivemind.dht.validation.DHTRecord) -> bool',
        "merge_with": "(self, other: 'RecordValidatorBase') -> bool",
    },
    "hivemind.dht.dht:DHT": {
        "run": "(self) -> 'None'",
    },
    "hivemind.utils.auth:TokenAuthorizerBase": {
        "get_token": '(self) -> auth_pb2.AccessToken',
        "is_token_valid": '(self, access_token: auth_pb2.AccessToken) -> bool',
        "does_token_need_refreshing": '(self, access_token: auth_pb2.AccessToken) -> bool',
    },
}
# the private methods swarmtrain calls (through the accessors below), likewise
CALLED = {
    "hivemind.optim.state_averager:TrainingStateAverager": {
        "_load_local_tensors_into_averager_": '(self)',
        "_update_scheduler": '(self)',
        "_apply_optimizer_parameters_": '(self)',
    },
}


def hooks(table):
    """(owner "module:Class", method name, signature) for every entry of OVERRIDDEN or CALLED."""
    return [(owner, name, signature) for owner, methods in table.items() for name, signature in methods.items()]


# SHA-256 of the source of hivemind's Optimizer._make_state_averager, whose arguments
# state_averager_arguments repeats: the compat test fails when hivemind's changes
MAKE_STATE_AVERAGER_SHA256 = "59a43eff001c328459717cc1cfaaeabcab193a030f20683af905327d8973c0cf"


def state_averager_arguments(optimizer) -> Dict[str, Any]:
    """What hivemind.Optimizer._make_state_averager passes its TrainingStateAverager, besides its own
    ``**kwargs`` (the optimizer, parameters, scheduler...): read from hivemind 1.1.12's source, whose
    hash is MAKE_STATE_AVERAGER_SHA256."""
    return dict(
        dht=optimizer.dht,
        prefix=f"{optimizer.run_id}_state_averager",
        min_matchmaking_time=optimizer.matchmaking_time,
        allreduce_timeout=optimizer.allreduce_timeout,
        shutdown_timeout=optimizer.shutdown_timeout,
        offload_optimizer=optimizer.offload_optimizer,
        custom_gradients=optimizer.offload_optimizer,
        status_loglevel=optimizer.status_loglevel,
        next_chunk_timeout=optimizer.next_chunk_timeout,
        client_mode=optimizer.client_mode,
        auxiliary=optimizer.auxiliary,
        start=True,
    )


# ------------------------------------------------------------------------------------------------
# private attributes
# ------------------------------------------------------------------------------------------------


def averager_p2p(averager):
    """The averager's P2P instance (DecentralizedAverager._p2p), in its own process."""
    return averager._p2p


def running_group_future(averager, group_id: bytes):
    """The future hivemind resolves with the object that serves a group's incoming all-reduce RPCs
    (DecentralizedAverager._running_groups[group_id])."""
    return averager._running_groups[group_id]


def group_registered(averager, group_id: bytes) -> bool:
    """Whether the averager runs (or is about to run) the all-reduce of this group here
    (group_id in DecentralizedAverager._running_groups)."""
    return group_id in averager._running_groups


def averaging_alpha(averager) -> float:
    """How much of an averaged update the averager applies (DecentralizedAverager._averaging_alpha)."""
    return averager._averaging_alpha


def load_local_tensors_into_averager(state_averager) -> None:
    state_averager._load_local_tensors_into_averager_()


def update_scheduler(state_averager) -> None:
    """Step the LR scheduler up to the state averager's epoch."""
    state_averager._update_scheduler()


def apply_optimizer_parameters(state_averager) -> None:
    """With offload_optimizer: copy the optimizer's parameters into the model's."""
    state_averager._apply_optimizer_parameters_()


def dht_request_pipe(dht):
    """The DHT process's end of the pipe that carries requests from other processes."""
    return dht._inner_pipe


def set_dht_request_pipe(dht, pipe) -> None:
    dht._inner_pipe = pipe


def tracker_public_key(tracker) -> bytes:
    """The subkey under which a ProgressTracker publishes its peer's progress."""
    return tracker._local_public_key


def is_signed_subkey(subkey) -> bool:
    """Whether a DHT subkey is of the ``[owner:<key>]`` form that RSASignatureValidator protects."""
    from hivemind.dht.crypto import RSASignatureValidator

    return isinstance(subkey, bytes) and RSASignatureValidator._PUBLIC_KEY_RE.search(subkey) is not None


def set_data_for_gather(step, data: bytes) -> None:
    """Replace what a StepControl gathers for its group (StepControl._data_for_gather), in the averager's
    process before matchmaking starts: the round check appends its seed commitment."""
    step._data_for_gather = data


def group_key_manager(averager):
    """The GroupKeyManager through which an averager finds potential leaders
    (DecentralizedAverager._matchmaking.group_key_manager), or None before matchmaking exists."""
    matchmaking = getattr(averager, "_matchmaking", None)
    return None if matchmaking is None else matchmaking.group_key_manager


def input_parts(container) -> list:
    """For each peer of an all-reduce, the (part, CompressionInfo) of the flat vector it reduces, in order
    (TensorPartContainer._input_parts_by_peer): parts are contiguous, peer after peer."""
    return [list(parts) for parts in container._input_parts_by_peer]


class CleanShutdownMixin:
    """Put in front of a hivemind averager: its process shuts down cleanly in the middle of a round.

    hivemind 1.1.12's ``DecentralizedAverager._shutdown`` calls ``finalize()`` on the *futures* of the
    running groups, not on the runners they resolve to (and adds finalize's None to a set): a peer
    stopped while one of its rounds was under way died with an AttributeError traceback. Same
    steps, on the runners."""

    async def _shutdown(self, timeout) -> None:
        if not self.client_mode:
            await self.remove_p2p_handlers(averager_p2p(self), namespace=self.prefix)
        for future in list(self._running_groups.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                finalize = getattr(future.result(), "finalize", None)
                if finalize is not None:  # hivemind's runner; the sparse round ends with the process
                    finalize(cancel=True)
            else:
                future.cancel()
