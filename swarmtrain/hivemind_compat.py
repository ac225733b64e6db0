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

from dataclasses import dataclass
from typing import Any, Dict

PINNED_VERSION = "1.1.12"


@dataclass(frozen=True)
class Hook:
    """A hivemind method that swarmtrain overrides."""

    owner: str  # "module:Class" of the hivemind class that defines it
    name: str
    signature: str  # str(inspect.signature(...)) in the pinned version


_AVERAGER = "hivemind.averaging.averager:DecentralizedAverager"
_OPTIMIZER = "hivemind.optim.optimizer:Optimizer"
_STATE_AVERAGER = "hivemind.optim.state_averager:TrainingStateAverager"
_RUNNER = "hivemind.averaging.allreduce:AllReduceRunner"
_REDUCER = "hivemind.averaging.partition:TensorPartReducer"
_TRACKER = "hivemind.optim.progress_tracker:ProgressTracker"

OVERRIDDEN = (
    # averagers: the all-reduce itself (compression.averager, averaging.local) and the access gate
    Hook(_AVERAGER, "_aggregate_with_group",
         "(self, group_info: 'GroupInfo', min_vector_size: 'int', **kwargs) -> 'GatheredData'"),
    Hook(_AVERAGER, "_run_allreduce_inplace_",
         "(self, tensors: 'Sequence[torch.Tensor]', group_info: 'GroupInfo', group_id: 'Optional[bytes]' = None, "
         "**kwargs)"),
    Hook(_AVERAGER, "get_current_state",
         "(self) -> 'Tuple[Any, Sequence[torch.Tensor], Sequence[CompressionInfo]]'"),
    Hook(_AVERAGER, "load_state_from_peers",
         "(self, wait: 'bool' = True, timeout: 'Optional[float]' = None) -> "
         "'Optional[Tuple[Any, Sequence[torch.Tensor]]]'"),
    Hook(_AVERAGER, "rpc_join_group",
         "(self, request: 'averaging_pb2.JoinRequest', context: 'P2PContext') -> "
         "'AsyncIterator[averaging_pb2.MessageFromLeader]'"),
    Hook(_AVERAGER, "rpc_aggregate_part",
         "(self, stream: 'AsyncIterator[averaging_pb2.AveragingData]', context: 'P2PContext') -> "
         "'AsyncIterator[averaging_pb2.AveragingData]'"),
    Hook(_AVERAGER, "rpc_download_state",
         "(self, _request: 'averaging_pb2.DownloadRequest', _context: 'P2PContext') -> "
         "'AsyncIterator[averaging_pb2.DownloadData]'"),
    Hook(_AVERAGER, "shutdown", "(self) -> 'None'"),
    Hook(_STATE_AVERAGER, "get_current_state", "(self)"),
    Hook(_STATE_AVERAGER, "load_state_from_peers", "(self, **kwargs)"),
    # the dense all-reduce: byte counting and the robust reducer (compression.averager)
    Hook(_RUNNER, "_get_peer_stub",
         "(self, peer: hivemind.p2p.p2p_daemon_bindings.datastructures.PeerID) -> hivemind.p2p.servicer.StubBase"),
    Hook(_RUNNER, "rpc_aggregate_part",
         "(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: hivemind.p2p.p2p_daemon.P2PContext) "
         "-> AsyncIterator[averaging_pb2.AveragingData]"),
    Hook(_REDUCER, "reset_accumulators", "(self)"),
    Hook(_REDUCER, "accumulate_part",
         "(self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0) -> "
         "torch.Tensor"),
    Hook(_REDUCER, "on_sender_failed", "(self, sender_index: int)"),
    Hook(_REDUCER, "check_current_part_finished", "(self)"),
    # the optimizer: round records, fingerprints, local mode (averaging.sync, averaging.local)
    Hook(_OPTIMIZER, "_make_state_averager", "(self, **kwargs) -> 'TrainingStateAverager'"),
    Hook(_OPTIMIZER, "_make_progress_tracker", "(self, target_batch_size: 'int', **kwargs) -> 'ProgressTracker'"),
    Hook(_OPTIMIZER, "_update_global_epoch", "(self, grad_scaler: 'Optional[GradScaler]') -> 'None'"),
    Hook(_OPTIMIZER, "_average_gradients_and_load_into_optimizer",
         "(self, maybe_step_control: 'Optional[StepControl]')"),
    Hook(_OPTIMIZER, "_should_load_state_from_peers", "(self) -> 'bool'"),
    Hook(_OPTIMIZER, "_tag_along_with_zero_weight", "(self, control: 'StepControl')"),
    Hook(_OPTIMIZER, "load_state_from_peers", "(self, **kwargs)"),
    Hook(_OPTIMIZER, "step",
         "(self, closure: 'Optional[Callable[[], torch.Tensor]]' = None, batch_size: 'Optional[int]' = None, "
         "grad_scaler: 'Optional[GradScaler]' = None)"),
    Hook(_OPTIMIZER, "shutdown", "(self)"),
    Hook(_TRACKER, "update_epoch", "(self, new_epoch: Optional[int] = None) -> int"),
    Hook(_TRACKER, "shutdown", "(self, timeout: Optional[float] = None)"),
    Hook("hivemind.optim.power_sgd_averager:PowerSGDGradientAverager", "_aggregate_with_group",
         "(self, group_info: hivemind.averaging.group_info.GroupInfo, min_vector_size: int, **kwargs) -> Any"),
    # the DHT process's request loop (net.dht.SwarmDHT)
    Hook("hivemind.dht.dht:DHT", "run", "(self) -> 'None'"),
    # the DHT's access tokens (access.authorizer.TokenAuthorizer): hivemind's abstract authorizer API
    Hook("hivemind.utils.auth:TokenAuthorizerBase", "get_token", "(self) -> auth_pb2.AccessToken"),
    Hook("hivemind.utils.auth:TokenAuthorizerBase", "is_token_valid",
         "(self, access_token: auth_pb2.AccessToken) -> bool"),
    Hook("hivemind.utils.auth:TokenAuthorizerBase", "does_token_need_refreshing",
         "(self, access_token: auth_pb2.AccessToken) -> bool"),
)

# the private methods swarmtrain calls (through the accessors below), with their pinned signatures
CALLED = (
    Hook(_STATE_AVERAGER, "_load_local_tensors_into_averager_", "(self)"),
    Hook(_STATE_AVERAGER, "_update_scheduler", "(self)"),
    Hook(_STATE_AVERAGER, "_apply_optimizer_parameters_", "(self)"),
)

# the source of hivemind's Optimizer._make_state_averager, whose arguments state_averager_arguments
# repeats; the compat test compares the installed source with this
MAKE_STATE_AVERAGER_SOURCE = '''    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        return TrainingStateAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )
'''


def state_averager_arguments(optimizer) -> Dict[str, Any]:
    """What hivemind.Optimizer._make_state_averager passes its TrainingStateAverager, besides its own
    ``**kwargs`` (the optimizer, parameters, scheduler...); see MAKE_STATE_AVERAGER_SOURCE."""
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
