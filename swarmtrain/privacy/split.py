"""Split contribution over hivemind's libp2p RPC: raw data never leaves the data owner.

    data owner (has X, y)                              trunk host (swarm peer)
    Z = bottom(X)  [+ privacy head: α·dCor(X, Z)]
    ── ExpertRequest{tensors=[Z, y], metadata} ──▶     validate; logits = trunk(Z); loss; backward;
    ◀── ExpertResponse{tensors=[∂loss/∂Z], meta} ──    optimizer step on the trunk
    validate ∂loss/∂Z; backward through bottom; step

Both sides validate everything they receive (tensor count, dtype, shape, size of the raw buffer,
finiteness, label range, magnitude) *before* using it; a bad request is refused with an error the
caller sees, a bad reply is dropped by the owner (no update), and both count what they dropped.

Async API (inside the event loop that owns the P2P):
    host = TrunkHost(trunk, optimizer, activation_shape=(64,), num_classes=10)
    await host.start(p2p)                       # registers the handlers
    client = DataOwnerClient(p2p, host_peer_id, bottom, head, optimizer)
    result = await client.train_step(x, y)      # -> SplitStepResult
Blocking entry points for the CLI: `run_trunk_host(...)`, `run_data_owner(...)`.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer, get_logger

from .config import PrivacyConfig
from .head import PrivacyHead, owner_head_config

logger = get_logger(__name__)

SPLIT_PROTOCOL_VERSION = 1
# hivemind's unary RPC payload limit (p2p_daemon_bindings.control.MAX_UNARY_PAYLOAD_SIZE is 2 MiB);
# stay below it with room for the protobuf framing.
MAX_REQUEST_BYTES = 2 * 1024**2 - 64 * 1024
# Activations beyond this magnitude are treated as garbage / poisoning, not as data.
DEFAULT_MAX_ABS_VALUE = 1e4

_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.int64: "int64"}


class InvalidTensor(ValueError):
    """A received tensor failed validation (wrong count, dtype, shape, size, non-finite, out of range)."""


def handler_names(run_id: str) -> Tuple[str, str]:
    """(train, evaluate) RPC names for a run; one trunk host can serve several runs."""
    return f"swarmtrain.split.{run_id}.train", f"swarmtrain.split.{run_id}.eval"


def _serialize(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return serialize_torch_tensor(tensor.detach().cpu().contiguous())


def receive_tensor(proto: runtime_pb2.Tensor, *, dtype: torch.dtype, shape: Sequence[int],
                   max_abs: Optional[float] = None, value_range: Optional[Tuple[int, int]] = None,
                   what: str = "tensor") -> torch.Tensor:
    """Deserialize one tensor only if it is exactly what the protocol expects; raise InvalidTensor.

    Checks run on the protobuf fields first (compression, dtype, shape, buffer length), so a
    malformed message is refused before any buffer is interpreted.
    """
    expected_dtype = _TORCH_DTYPE_NAMES[dtype]
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise InvalidTensor(f"{what}: compression {proto.compression} not accepted (NONE only)")
    if proto.dtype != expected_dtype:
        raise InvalidTensor(f"{what}: dtype {proto.dtype!r}, expected {expected_dtype!r}")
    if tuple(proto.size) != tuple(shape):
        raise InvalidTensor(f"{what}: shape {tuple(proto.size)}, expected {tuple(shape)}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(proto.buffer) != math.prod(shape) * itemsize:
        raise InvalidTensor(f"{what}: buffer of {len(proto.buffer)} bytes does not match shape {tuple(shape)}")
    tensor = deserialize_torch_tensor(proto).detach()
    if tensor.is_floating_point():
        if not torch.isfinite(tensor).all():
            raise InvalidTensor(f"{what}: contains NaN or Inf")
        if max_abs is not None and tensor.numel() and tensor.abs().max() > max_abs:
            raise InvalidTensor(f"{what}: magnitude {float(tensor.abs().max()):.3g} above the limit {max_abs:g}")
    if value_range is not None and tensor.numel():
        low, high = value_range
        if tensor.min() < low or tensor.max() >= high:
            raise InvalidTensor(f"{what}: values outside [{low}, {high})")
    return tensor


def _decode_metadata(raw: bytes) -> dict:
    try:
        meta = MSGPackSerializer.loads(raw) if raw else {}
    except Exception as e:  # any msgpack error means garbage
        raise InvalidTensor(f"metadata is not valid msgpack: {e!r}") from None
    if not isinstance(meta, dict):
        raise InvalidTensor("metadata must be a map")
    return meta


# ------------------------------------------------------------------------------------------------
# Trunk host
# ------------------------------------------------------------------------------------------------
@dataclass
class TrunkHostStats:
    steps: int = 0              # optimizer steps taken on the trunk
    samples: int = 0
    rejected: int = 0           # requests refused by validation
    unauthorized: int = 0       # requests refused because the caller may not use this trunk (no valid access token)
    evaluations: int = 0
    last_loss: Optional[float] = None
    last_reject_reason: Optional[str] = None


class TrunkHost:
    """Runs the layers after the cut for data owners: forward, loss, backward, optimizer step.

    activation_shape: per-sample shape of Z (the only shape accepted); labels are int64 class ids
    in [0, num_classes). Steps are serialized by a lock (one optimizer, many owners) and run in a
    worker thread so the P2P event loop keeps serving while the trunk computes.

    authorize: optional `async (caller's peer ID, what) -> bool`, asked before a request is even
    parsed; a caller it refuses gets an error and nothing else (a token-gated run passes the
    averagers' token check, see swarmtrain.privacy.swarm).
    """

    def __init__(self, trunk: nn.Module, optimizer: torch.optim.Optimizer, *, activation_shape: Sequence[int],
                 num_classes: int, run_id: str = "swarmtrain", max_batch_size: int = 1024,
                 max_abs_activation: float = DEFAULT_MAX_ABS_VALUE,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 authorize: Optional[Callable[[PeerID, str], Awaitable[bool]]] = None):
        self.trunk, self.optimizer, self.loss_fn, self.authorize = trunk, optimizer, loss_fn, authorize
        self.activation_shape = tuple(int(d) for d in activation_shape)
        self.num_classes, self.max_batch_size, self.max_abs_activation = num_classes, max_batch_size, max_abs_activation
        self.train_handler, self.eval_handler = handler_names(run_id)
        self.stats = TrunkHostStats()
        self._lock = asyncio.Lock()
        self._p2p: Optional[P2P] = None

    async def start(self, p2p: P2P) -> None:
        self._p2p = p2p
        await p2p.add_protobuf_handler(self.train_handler, self._handle_train, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(self.eval_handler, self._handle_eval, runtime_pb2.ExpertRequest)

    async def stop(self) -> None:
        if self._p2p is not None:
            for name in (self.train_handler, self.eval_handler):
                try:
                    await self._p2p.remove_protobuf_handler(name)
                except Exception as e:  # daemon already gone on shutdown: nothing left to remove
                    logger.debug(f"removing handler {name}: {e!r}")
            self._p2p = None

    def _parse_request(self, request: runtime_pb2.ExpertRequest, with_labels: bool):
        meta = _decode_metadata(request.metadata)
        if meta.get("version") != SPLIT_PROTOCOL_VERSION:
            raise InvalidTensor(f"protocol version {meta.get('version')!r}, expected {SPLIT_PROTOCOL_VERSION}")
        expected = 2 if with_labels else 1
        if len(request.tensors) != expected:
            raise InvalidTensor(f"expected {expected} tensors, got {len(request.tensors)}")
        sizes = request.tensors[0].size
        batch = sizes[0] if len(sizes) else 0
        if not 1 <= batch <= self.max_batch_size:
            raise InvalidTensor(f"batch size {batch} outside [1, {self.max_batch_size}]")
        z = receive_tensor(request.tensors[0], dtype=torch.float32, shape=(batch, *self.activation_shape),
                           max_abs=self.max_abs_activation, what="activations")
        y = None
        if with_labels:
            y = receive_tensor(request.tensors[1], dtype=torch.int64, shape=(batch,),
                               value_range=(0, self.num_classes), what="labels")
        return z, y

    async def _check_caller(self, context: P2PContext, what: str) -> None:
        if self.authorize is not None and not await self.authorize(context.remote_id, what):
            self.stats.unauthorized += 1  # the check logs the refusal (once a minute per peer)
            raise PermissionError(f"peer {context.remote_id} has no valid access token for this run")

    def _reject(self, error: Exception, context: P2PContext):
        self.stats.rejected += 1
        self.stats.last_reject_reason = str(error)
        logger.warning(f"split trunk: refused a request from {context.remote_id}: {error}")

    def _train_step(self, z: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, float, int]:
        self.trunk.train()
        z = z.requires_grad_(True)
        logits = self.trunk(z)
        loss = self.loss_fn(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        correct = int((logits.detach().argmax(dim=1) == y).sum())
        return z.grad.detach(), float(loss.detach()), correct

    @torch.no_grad()
    def _evaluate(self, z: torch.Tensor) -> torch.Tensor:
        self.trunk.eval()
        return self.trunk(z).float()

    async def _handle_train(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        await self._check_caller(context, "a split training step")
        try:
            z, y = self._parse_request(request, with_labels=True)
        except InvalidTensor as e:
            self._reject(e, context)
            raise
        async with self._lock:
            grad_z, loss, correct = await asyncio.get_running_loop().run_in_executor(None, self._train_step, z, y)
        if not math.isfinite(loss):
            # Never send a non-finite gradient back; the owner would drop it anyway.
            raise ValueError("trunk loss is not finite")
        self.stats.steps += 1
        self.stats.samples += len(y)
        self.stats.last_loss = loss
        meta = {"version": SPLIT_PROTOCOL_VERSION, "loss": loss, "correct": correct, "step": self.stats.steps}
        return runtime_pb2.ExpertResponse(tensors=[_serialize(grad_z)], metadata=MSGPackSerializer.dumps(meta))

    async def _handle_eval(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        await self._check_caller(context, "a split evaluation")
        try:
            z, _ = self._parse_request(request, with_labels=False)
        except InvalidTensor as e:
            self._reject(e, context)
            raise
        async with self._lock:
            logits = await asyncio.get_running_loop().run_in_executor(None, self._evaluate, z)
        self.stats.evaluations += 1
        return runtime_pb2.ExpertResponse(tensors=[_serialize(logits)],
                                          metadata=MSGPackSerializer.dumps({"version": SPLIT_PROTOCOL_VERSION}))


# ------------------------------------------------------------------------------------------------
# Data owner
# ------------------------------------------------------------------------------------------------
def owner_privacy_head(bottom_model: nn.Module, privacy: PrivacyConfig, cut_layer: str, *,
                       num_classes: Optional[int] = None, seed: Optional[int] = None) -> PrivacyHead:
    """The data owner's privacy head: every defence setting of the run's privacy section (alpha,
    cut_noise, adversary_weight, warmup_steps, leakage_statistic) at the owner's `cut_layer` of
    `bottom_model`; with privacy.enabled false it only measures leakage. num_classes lets the
    adversary's decoder see the labels (what Z reveals *beyond* the label is what it removes)."""
    return PrivacyHead(bottom_model, owner_head_config(privacy, cut_layer), num_classes=num_classes, seed=seed)


@dataclass
class SplitStepResult:
    applied: bool                    # False: the reply was dropped and nothing was updated
    loss: Optional[float] = None     # trunk task loss on this batch
    batch_accuracy: Optional[float] = None
    leakage: Optional[float] = None  # privacy head's leakage dCor of this batch
    error: Optional[str] = None


@dataclass
class DataOwnerStats:
    steps: int = 0
    dropped: int = 0
    last_error: Optional[str] = None
    bytes_sent: int = 0


class DataOwnerClient:
    """Trains `bottom` (the layers up to the cut) against a remote trunk; only Z and y are sent.

    privacy_head: a PrivacyHead attached to `bottom` at its last layer (its captured Z must be the
    tensor bottom returns, so with cut noise what is sent is the released, noisy Z), or None (see
    owner_privacy_head). Its terms (α·dCor(X, Z), the adversary) are optimised locally with the
    trunk's gradient; its leakage is reported in each SplitStepResult.
    """

    def __init__(self, p2p: P2P, trunk_peer_id: PeerID, bottom_model: nn.Module,
                 privacy_head: Optional[PrivacyHead], optimizer: torch.optim.Optimizer, *, run_id: str = "swarmtrain",
                 request_timeout: float = 30.0, num_classes: Optional[int] = None):
        self.p2p, self.trunk_peer_id, self.bottom, self.head, self.optimizer = (
            p2p, trunk_peer_id, bottom_model, privacy_head, optimizer)
        self.train_handler, self.eval_handler = handler_names(run_id)
        self.request_timeout, self.num_classes = request_timeout, num_classes
        self.stats = DataOwnerStats()

    def _cut_activations(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bottom(x)
        if self.head is not None and self.head.shared_activation is not z:
            raise RuntimeError(f"the privacy head's cut layer {self.head.config.cut_layer!r} is not the last layer of "
                               f"the bottom model: attach it to the module whose output bottom() returns")
        if z.dtype != torch.float32:
            raise TypeError(f"cut activations must be float32 on the wire, got {z.dtype}")
        return z

    def _request(self, z: torch.Tensor, y: Optional[torch.Tensor]) -> runtime_pb2.ExpertRequest:
        """The only message the owner ever sends: Z (detached) and, for training, the labels."""
        tensors = [_serialize(z.float())]
        if y is not None:
            tensors.append(_serialize(y.to(torch.int64)))
        request = runtime_pb2.ExpertRequest(tensors=tensors,
                                            metadata=MSGPackSerializer.dumps({"version": SPLIT_PROTOCOL_VERSION}))
        size = request.ByteSize()
        if size > MAX_REQUEST_BYTES:
            raise ValueError(f"a batch of {z.shape[0]} activations is {size} bytes, above the {MAX_REQUEST_BYTES}-byte "
                             f"RPC limit: use a smaller batch")
        self.stats.bytes_sent += size
        return request

    async def _call(self, name: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        return await asyncio.wait_for(
            self.p2p.call_protobuf_handler(self.trunk_peer_id, name, request, runtime_pb2.ExpertResponse),
            timeout=self.request_timeout)

    def _drop(self, reason: str) -> SplitStepResult:
        self.stats.dropped += 1
        self.stats.last_error = reason
        logger.warning(f"split data owner: dropped a step: {reason}")
        return SplitStepResult(applied=False, error=reason)

    async def train_step(self, x: torch.Tensor, y: torch.Tensor) -> SplitStepResult:
        """One step: send Z and y, receive ∂loss/∂Z, update the bottom (plus the NoPeek term)."""
        self.bottom.train()
        z = self._cut_activations(x)
        request = self._request(z, y)  # a batch too large for the RPC is the caller's error: raise
        try:
            response = await self._call(self.train_handler, request)
            grad_z = self._received_one(response, z.shape, "gradient")
            meta = _decode_metadata(response.metadata)
            loss, correct = meta.get("loss"), meta.get("correct")
            if not isinstance(loss, (int, float)) or not math.isfinite(loss):
                raise InvalidTensor(f"trunk reported a non-finite or missing loss {loss!r}")
        except Exception as e:  # timeout, refused request, garbage reply: drop the step, keep going
            return self._drop(f"{type(e).__name__}: {e}")

        # Surrogate whose gradient w.r.t. the bottom is J_zᵀ·∂loss/∂Z (+ the privacy head's terms: α·∂dCor/∂θ
        # and the adversary's, whose decoder sees the labels if the head was given num_classes).
        surrogate = (z * grad_z).sum()
        leakage = None
        if self.head is not None:
            if self.head.penalises:
                surrogate = surrogate + self.head.penalty(labels=y).to(surrogate.dtype)
            else:
                self.head.measure()
            leakage = self.head.last_leakage
        self.optimizer.zero_grad(set_to_none=True)
        surrogate.backward()
        self.optimizer.step()
        self.stats.steps += 1
        accuracy = correct / len(y) if isinstance(correct, int) and 0 <= correct <= len(y) else None
        return SplitStepResult(applied=True, loss=float(loss), batch_accuracy=accuracy, leakage=leakage)

    def _received_one(self, response: runtime_pb2.ExpertResponse, shape, what: str) -> torch.Tensor:
        if len(response.tensors) != 1:
            raise InvalidTensor(f"expected 1 tensor in the reply, got {len(response.tensors)}")
        return receive_tensor(response.tensors[0], dtype=torch.float32, shape=tuple(shape),
                              max_abs=DEFAULT_MAX_ABS_VALUE, what=what)

    async def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for x from the remote trunk (only Z is sent); raises InvalidTensor on a bad reply."""
        self.bottom.eval()
        with torch.no_grad():
            z = self._cut_activations(x)
        response = await self._call(self.eval_handler, self._request(z, None))
        if len(response.tensors) != 1 or len(response.tensors[0].size) != 2:
            raise InvalidTensor("evaluation reply must be one [batch, classes] tensor")
        classes = response.tensors[0].size[1]
        if self.num_classes is not None and classes != self.num_classes:
            raise InvalidTensor(f"evaluation reply has {classes} classes, expected {self.num_classes}")
        return self._received_one(response, (x.shape[0], classes), "logits")

    async def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
        correct = 0
        for start in range(0, len(x), batch_size):
            logits = await self.predict(x[start:start + batch_size])
            correct += int((logits.argmax(dim=1) == y[start:start + batch_size]).sum())
        return correct / len(x)


# ------------------------------------------------------------------------------------------------
# Blocking entry points (for `swarmtrain peer --role data-owner|trunk`)
# ------------------------------------------------------------------------------------------------
async def _p2p_from(p2p_or_dht) -> P2P:
    if isinstance(p2p_or_dht, P2P):
        return p2p_or_dht
    if hasattr(p2p_or_dht, "replicate_p2p"):  # hivemind.DHT: share its daemon from this process
        return await p2p_or_dht.replicate_p2p()
    raise TypeError(f"expected a hivemind.P2P or hivemind.DHT, got {type(p2p_or_dht).__name__}")


def run_trunk_host(p2p_or_dht, trunk: nn.Module, optimizer: torch.optim.Optimizer, *,
                   activation_shape: Sequence[int], num_classes: int, run_id: str = "swarmtrain",
                   stop_event: Optional[threading.Event] = None, on_started: Optional[Callable[[TrunkHost], None]] = None,
                   report_every: float = 30.0, **host_kwargs) -> TrunkHostStats:
    """Serve the trunk until `stop_event` is set (or KeyboardInterrupt); returns the final stats.

    Pass a hivemind.DHT (its P2P daemon is shared via replicate_p2p) or a P2P created in *this*
    thread's loop context (a P2P is bound to the loop it was created in, so a DHT is easier).
    """
    stop_event = stop_event or threading.Event()

    async def serve() -> TrunkHostStats:
        p2p = await _p2p_from(p2p_or_dht)
        host = TrunkHost(trunk, optimizer, activation_shape=activation_shape, num_classes=num_classes,
                         run_id=run_id, **host_kwargs)
        await host.start(p2p)
        if on_started is not None:
            on_started(host)
        last_report = time.monotonic()
        try:
            while not stop_event.is_set():
                await asyncio.sleep(0.1)
                if time.monotonic() - last_report > report_every:
                    logger.info(f"split trunk: {host.stats}")
                    last_report = time.monotonic()
        finally:
            await host.stop()
        return host.stats

    try:
        return asyncio.run(serve())
    except KeyboardInterrupt:
        stop_event.set()
        raise


def run_data_owner(p2p_or_dht, trunk_peer_id: Union[PeerID, str], bottom_model: nn.Module,
                   privacy_head: Optional[PrivacyHead], optimizer: torch.optim.Optimizer,
                   batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *, run_id: str = "swarmtrain",
                   on_step: Optional[Callable[[SplitStepResult], None]] = None, **client_kwargs) -> DataOwnerStats:
    """Blocking loop over `batches` ((x, y) pairs); calls on_step after each step; returns stats."""
    peer_id = PeerID.from_base58(trunk_peer_id) if isinstance(trunk_peer_id, str) else trunk_peer_id

    async def train() -> DataOwnerStats:
        p2p = await _p2p_from(p2p_or_dht)
        client = DataOwnerClient(p2p, peer_id, bottom_model, privacy_head, optimizer, run_id=run_id, **client_kwargs)
        for x, y in batches:
            result = await client.train_step(x, y)
            if on_step is not None:
                on_step(result)
        return client.stats

    return asyncio.run(train())
