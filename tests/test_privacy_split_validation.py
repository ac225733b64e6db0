"""Both ends of split contribution refuse garbage before using it (no P2P needed: handlers called directly)."""
import asyncio
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from swarmtrain.privacy import PrivacyConfig, PrivacyHead
from swarmtrain.privacy.head import calibrated_release
from swarmtrain.privacy.split import (SPLIT_PROTOCOL_VERSION, DataOwnerClient, InvalidTensor, TrunkHost,
                                      owner_privacy_head)

WIDTH, CLASSES = 4, 3
CONTEXT = SimpleNamespace(remote_id="test-peer")
META = MSGPackSerializer.dumps({"version": SPLIT_PROTOCOL_VERSION})


def _host():
    torch.manual_seed(0)
    trunk = nn.Linear(WIDTH, CLASSES)
    return TrunkHost(trunk, torch.optim.SGD(trunk.parameters(), lr=0.1), activation_shape=(WIDTH,),
                     num_classes=CLASSES, max_batch_size=16)


def _request(z, y, metadata=META, **z_kwargs):
    tensors = [serialize_torch_tensor(z, **z_kwargs)] + ([serialize_torch_tensor(y)] if y is not None else [])
    return runtime_pb2.ExpertRequest(tensors=tensors, metadata=metadata)


def _with_bad_buffer():
    request = _request(torch.randn(5, WIDTH), torch.zeros(5, dtype=torch.int64))
    request.tensors[0].buffer = request.tensors[0].buffer[:-4]
    return request


GOOD_Y = torch.tensor([0, 1, 2, 1, 0])
BAD_REQUESTS = {
    "nan": lambda: _request(torch.tensor([[float("nan")] * WIDTH] * 5), GOOD_Y),
    "inf": lambda: _request(torch.full((5, WIDTH), float("inf")), GOOD_Y),
    "huge": lambda: _request(torch.full((5, WIDTH), 1e9), GOOD_Y),
    "wrong_width": lambda: _request(torch.randn(5, WIDTH + 1), GOOD_Y),
    "raw_image_shape": lambda: _request(torch.randn(5, 8, 8), GOOD_Y),
    "float64": lambda: _request(torch.randn(5, WIDTH, dtype=torch.float64), GOOD_Y),
    "fp16_compressed": lambda: _request(torch.randn(5, WIDTH), GOOD_Y,
                                        compression_type=runtime_pb2.CompressionType.FLOAT16),
    "label_out_of_range": lambda: _request(torch.randn(5, WIDTH), torch.tensor([0, 1, 2, 3, 0])),
    "negative_label": lambda: _request(torch.randn(5, WIDTH), torch.tensor([0, -1, 2, 1, 0])),
    "float_labels": lambda: _request(torch.randn(5, WIDTH), GOOD_Y.float()),
    "label_count": lambda: _request(torch.randn(5, WIDTH), GOOD_Y[:4]),
    "missing_labels": lambda: _request(torch.randn(5, WIDTH), None),
    "extra_tensor": lambda: runtime_pb2.ExpertRequest(
        tensors=list(_request(torch.randn(5, WIDTH), GOOD_Y).tensors) + [serialize_torch_tensor(torch.randn(5, 64))],
        metadata=META),
    "empty_batch": lambda: _request(torch.randn(0, WIDTH), torch.zeros(0, dtype=torch.int64)),
    "batch_too_large": lambda: _request(torch.randn(17, WIDTH), torch.zeros(17, dtype=torch.int64)),
    "truncated_buffer": _with_bad_buffer,
    "wrong_version": lambda: _request(torch.randn(5, WIDTH), GOOD_Y, metadata=MSGPackSerializer.dumps({"version": 99})),
    "garbage_metadata": lambda: _request(torch.randn(5, WIDTH), GOOD_Y, metadata=b"\xc1\xc1\xc1"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_trunk_host_refuses_garbage_without_touching_the_trunk(name):
    host = _host()
    weights = host.trunk.weight.detach().clone()
    with pytest.raises(InvalidTensor):
        asyncio.run(host._handle_train(BAD_REQUESTS[name](), CONTEXT))
    assert host.stats.rejected == 1 and host.stats.steps == 0
    assert torch.equal(host.trunk.weight, weights)


def test_trunk_host_steps_on_a_valid_request_and_returns_the_activation_gradient():
    host = _host()
    trunk_before = copy.deepcopy(host.trunk)
    z = torch.randn(5, WIDTH)
    response = asyncio.run(host._handle_train(_request(z, GOOD_Y), CONTEXT))
    assert len(response.tensors) == 1 and list(response.tensors[0].size) == [5, WIDTH]
    meta = MSGPackSerializer.loads(response.metadata)
    assert meta["version"] == SPLIT_PROTOCOL_VERSION and meta["loss"] > 0
    assert host.stats.steps == 1 and not torch.equal(host.trunk.weight, trunk_before.weight)
    # the returned gradient is ∂CE/∂Z under the trunk's pre-step weights
    z_leaf = z.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(trunk_before(z_leaf), GOOD_Y).backward()
    assert torch.allclose(deserialize_torch_tensor(response.tensors[0]), z_leaf.grad, atol=1e-6)
    evaluation = asyncio.run(host._handle_eval(_request(z, None), CONTEXT))
    assert list(evaluation.tensors[0].size) == [5, CLASSES]


class FakeP2P:
    """Stands in for hivemind.P2P: records requests and answers with a scripted reply."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    async def call_protobuf_handler(self, peer_id, name, request, output_type):
        self.requests.append((name, request))
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def _reply(grad, loss=1.0, correct=2):
    return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(grad)],
                                      metadata=MSGPackSerializer.dumps({"version": 1, "loss": loss, "correct": correct}))


BAD_REPLIES = {
    "nan_gradient": _reply(torch.full((5, WIDTH), float("nan"))),
    "wrong_shape": _reply(torch.randn(5, WIDTH + 1)),
    "wrong_batch": _reply(torch.randn(4, WIDTH)),
    "float64": _reply(torch.randn(5, WIDTH, dtype=torch.float64)),
    "nan_loss": _reply(torch.randn(5, WIDTH), loss=float("nan")),
    "no_tensors": runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps({"loss": 1.0})),
    "remote_error": RuntimeError("P2PHandlerError: trunk refused"),
    "timeout": asyncio.TimeoutError(),
}


def _owner(reply):
    torch.manual_seed(0)
    bottom = nn.Sequential(nn.Linear(6, WIDTH), nn.Tanh())
    head = PrivacyHead(bottom, PrivacyConfig(enabled=True, cut_layer="1", alpha=0.5))
    p2p = FakeP2P(reply)
    client = DataOwnerClient(p2p, "trunk", bottom, head, torch.optim.SGD(bottom.parameters(), lr=0.1))
    return client, p2p


@pytest.mark.parametrize("name", sorted(BAD_REPLIES))
def test_data_owner_drops_garbage_replies_without_updating(name):
    client, _ = _owner(BAD_REPLIES[name])
    weights = client.bottom[0].weight.detach().clone()
    result = asyncio.run(client.train_step(torch.randn(5, 6), GOOD_Y))
    assert not result.applied and result.error
    assert client.stats.dropped == 1 and client.stats.steps == 0
    assert torch.equal(client.bottom[0].weight, weights)


def test_data_owner_applies_a_valid_gradient_and_sends_only_z_and_labels():
    client, p2p = _owner(_reply(torch.ones(5, WIDTH)))
    weights = client.bottom[0].weight.detach().clone()
    x = torch.randn(5, 6)
    result = asyncio.run(client.train_step(x, GOOD_Y))
    assert result.applied and result.loss == 1.0 and result.batch_accuracy == pytest.approx(0.4)
    assert 0.0 <= result.leakage <= 1.0
    assert not torch.equal(client.bottom[0].weight, weights)
    (name, request), = p2p.requests
    assert [list(t.size) for t in request.tensors] == [[5, WIDTH], [5]]
    assert [t.dtype for t in request.tensors] == ["float32", "int64"]
    assert MSGPackSerializer.loads(request.metadata) == {"version": SPLIT_PROTOCOL_VERSION}


def test_head_must_sit_at_the_bottom_models_output():
    bottom = nn.Sequential(nn.Linear(6, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
    head = PrivacyHead(bottom, PrivacyConfig(enabled=True, cut_layer="1", alpha=0.5))
    client = DataOwnerClient(FakeP2P(None), "trunk", bottom, head, torch.optim.SGD(bottom.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="not the last layer"):
        asyncio.run(client.train_step(torch.randn(5, 6), GOOD_Y))


def test_the_owner_sends_the_released_z_and_trains_against_the_adversary_with_its_labels():
    """With the run's privacy section passed through (owner_privacy_head), what goes on the wire is the
    calibrated, noisy release of Z, not Z, and the adversary's decoder is conditioned on the labels."""
    torch.manual_seed(0)
    bottom = nn.Sequential(nn.Linear(6, WIDTH), nn.Tanh())
    run_privacy = PrivacyConfig(enabled=True, alpha=0.5, cut_noise=0.8, adversary_weight=1.0, warmup_steps=0,
                                split={"cut_width": WIDTH})
    head = owner_privacy_head(bottom, run_privacy, "1", num_classes=CLASSES, seed=3)
    p2p = FakeP2P(_reply(torch.ones(5, WIDTH)))
    client = DataOwnerClient(p2p, "trunk", bottom, head, torch.optim.SGD(bottom.parameters(), lr=0.1))
    x = torch.randn(5, 6)
    clean = torch.tanh(bottom[0](x)).detach()  # bottom[0] is before the hooked cut: no noise drawn
    result = asyncio.run(client.train_step(x, GOOD_Y))
    assert result.applied and head.stats.adversary_r2 is not None and head.adversary.num_classes == CLASSES
    (name, request), = p2p.requests
    sent = deserialize_torch_tensor(request.tensors[0])
    assert torch.allclose(sent, calibrated_release(clean, 0.8, torch.Generator().manual_seed(3)), atol=1e-5)
    assert not torch.allclose(sent, clean, atol=0.1)
