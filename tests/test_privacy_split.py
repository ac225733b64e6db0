"""Split contribution over real hivemind P2P on loopback: only Z and labels leave the data owner."""
import asyncio
import multiprocessing as mp
import threading

import numpy as np
import pytest
import torch

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from swarmtrain.privacy import PrivacyConfig, PrivacyHead
from swarmtrain.privacy.digits import DigitsNet, load_digits_splits
from swarmtrain.privacy.split import (SPLIT_PROTOCOL_VERSION, DataOwnerClient, TrunkHost, handler_names,
                                      run_data_owner, run_trunk_host)

CUT_WIDTH = 32  # != 64 input pixels, so "Z-shaped" and "X-shaped" messages cannot be confused
BATCH = 64
EPOCHS = 12
RUN_ID = "split_test"
MIN_TEST_ACCURACY = 0.80  # chance is 0.10 on 10 balanced classes


def _trunk_process(address_queue, result_queue, stop_event):
    torch.set_num_threads(1)

    async def main():
        torch.manual_seed(1)
        trunk = DigitsNet(cut_width=CUT_WIDTH).classifier
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        host = TrunkHost(trunk, torch.optim.Adam(trunk.parameters(), lr=1e-3), activation_shape=(CUT_WIDTH,),
                         num_classes=10, run_id=RUN_ID, max_batch_size=256)
        await host.start(p2p)
        maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
        address_queue.put((p2p.peer_id.to_base58(), maddrs))
        while not stop_event.is_set():
            await asyncio.sleep(0.05)
        await host.stop()
        await p2p.shutdown()
        result_queue.put(vars(host.stats))

    asyncio.run(main())


def _owner_process(trunk_peer, maddrs, result_queue):
    torch.set_num_threads(1)
    splits = load_digits_splits(seed=0)

    async def main():
        p2p = await P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        # Record every byte string this process hands to the p2p daemon for another peer.
        outgoing = []
        original_unary = p2p._client.call_unary_handler
        original_stream_open = p2p._client.stream_open

        async def recording_unary(peer_id, handle_name, data):
            outgoing.append((handle_name, bytes(data)))
            return await original_unary(peer_id, handle_name, data)

        async def recording_stream_open(peer_id, protocols):
            outgoing.append(("STREAM:" + ",".join(protocols), b""))
            return await original_stream_open(peer_id, protocols)

        p2p._client.call_unary_handler = recording_unary
        p2p._client.stream_open = recording_stream_open

        torch.manual_seed(0)
        bottom = DigitsNet(cut_width=CUT_WIDTH).features
        head = PrivacyHead(bottom, PrivacyConfig(enabled=True, cut_layer="3", alpha=0.3))
        client = DataOwnerClient(p2p, PeerID.from_base58(trunk_peer), bottom, head,
                                 torch.optim.Adam(bottom.parameters(), lr=1e-3), run_id=RUN_ID, num_classes=10)
        generator = torch.Generator().manual_seed(0)
        losses, leakages = [], []
        for _ in range(EPOCHS):
            order = torch.randperm(len(splits.private_x), generator=generator)
            for start in range(0, len(order) - BATCH + 1, BATCH):
                idx = order[start:start + BATCH]
                result = await client.train_step(splits.private_x[idx], splits.private_y[idx])
                assert result.applied, result.error
                losses.append(result.loss)
                leakages.append(result.leakage)
        test_accuracy = await client.evaluate(splits.test_x, splits.test_y)
        await p2p.shutdown()
        result_queue.put({"outgoing": outgoing, "losses": losses, "leakages": leakages,
                          "test_accuracy": test_accuracy, "owner_stats": vars(client.stats)})

    asyncio.run(main())


def test_data_owner_trains_through_remote_trunk_and_sends_only_activations_and_labels():
    ctx = mp.get_context("fork")
    address_queue, trunk_results, owner_results, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    trunk = ctx.Process(target=_trunk_process, args=(address_queue, trunk_results, stop), daemon=True)
    trunk.start()
    owner = None
    try:
        trunk_peer, maddrs = address_queue.get(timeout=60)
        owner = ctx.Process(target=_owner_process, args=(trunk_peer, maddrs, owner_results), daemon=True)
        owner.start()
        result = owner_results.get(timeout=240)
        owner.join(timeout=30)
        stop.set()
        trunk_stats = trunk_results.get(timeout=30)
        trunk.join(timeout=30)
    finally:
        stop.set()
        for process in (owner, trunk):
            if process is not None and process.is_alive():
                process.terminate()
                process.join(5)

    splits = load_digits_splits(seed=0)
    raw_rows = torch.cat([splits.private_x, splits.test_x])
    train_name, eval_name = handler_names(RUN_ID)
    steps = EPOCHS * (len(splits.private_x) // BATCH)

    # 1) What left the owner: only our two RPCs, each a Z-shaped float32 batch (+ int64 labels).
    assert result["outgoing"], "the recorder saw no traffic"
    assert {name for name, _ in result["outgoing"]} <= {train_name, eval_name}
    n_train = 0
    for name, payload in result["outgoing"]:
        request = runtime_pb2.ExpertRequest.FromString(payload)
        assert request.uid == ""
        assert MSGPackSerializer.loads(request.metadata) == {"version": SPLIT_PROTOCOL_VERSION}
        z_proto = request.tensors[0]
        assert z_proto.dtype == "float32" and len(z_proto.size) == 2 and z_proto.size[1] == CUT_WIDTH
        batch = z_proto.size[0]
        if name == train_name:
            n_train += 1
            assert len(request.tensors) == 2
            assert request.tensors[1].dtype == "int64" and list(request.tensors[1].size) == [batch]
        else:
            assert len(request.tensors) == 1  # evaluation sends no labels
        z = torch.from_numpy(np.frombuffer(z_proto.buffer, dtype=np.float32).copy()).view(batch, CUT_WIDTH)
        # no raw image row hides in the payload (not even a prefix of one)
        assert torch.cdist(z.double(), raw_rows[:, :CUT_WIDTH].double()).min() > 1e-3
    assert n_train == steps
    assert result["owner_stats"]["dropped"] == 0 and result["owner_stats"]["steps"] == steps

    # 2) The split model learned: far above chance, and the trunk host did every step.
    assert result["test_accuracy"] >= MIN_TEST_ACCURACY, result["test_accuracy"]
    assert np.mean(result["losses"][-10:]) < 0.5 * np.mean(result["losses"][:10])
    assert trunk_stats["steps"] == steps and trunk_stats["rejected"] == 0
    assert all(0.0 <= leak <= 1.0 for leak in result["leakages"])
    print(f"split training: test accuracy {result['test_accuracy']:.3f} after {steps} remote steps, "
          f"last leakage dCor_U {result['leakages'][-1]:.3f}")


def _dht_trunk_process(address_queue, stop_queue, result_queue):
    torch.set_num_threads(1)
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    address_queue.put((dht.peer_id.to_base58(), [str(m) for m in dht.get_visible_maddrs()]))
    stop = threading.Event()
    threading.Thread(target=lambda: (stop_queue.get(), stop.set()), daemon=True).start()
    torch.manual_seed(1)
    trunk = DigitsNet(cut_width=CUT_WIDTH).classifier
    try:
        stats = run_trunk_host(dht, trunk, torch.optim.Adam(trunk.parameters(), lr=1e-3),
                               activation_shape=(CUT_WIDTH,), num_classes=10, run_id=RUN_ID, stop_event=stop)
        result_queue.put(vars(stats))
    finally:
        dht.shutdown()


def _dht_owner_process(trunk_peer, maddrs, result_queue):
    torch.set_num_threads(1)
    dht = hivemind.DHT(start=True, initial_peers=maddrs, client_mode=True)
    try:
        splits = load_digits_splits(seed=0)
        torch.manual_seed(0)
        bottom = DigitsNet(cut_width=CUT_WIDTH).features
        head = PrivacyHead(bottom, PrivacyConfig(enabled=True, cut_layer="3", alpha=0.3))
        batches = [(splits.private_x[i:i + BATCH], splits.private_y[i:i + BATCH])
                   for _ in range(5) for i in range(0, len(splits.private_x) - BATCH + 1, BATCH)]
        results = []
        stats = run_data_owner(dht, trunk_peer, bottom, head, torch.optim.Adam(bottom.parameters(), lr=1e-3),
                               batches, run_id=RUN_ID, on_step=results.append)
        result_queue.put({"stats": vars(stats), "losses": [r.loss for r in results]})
    finally:
        dht.shutdown()


@pytest.mark.slow
def test_blocking_entry_points_over_a_dht():
    """The CLI path: run_trunk_host / run_data_owner sharing the P2P daemon of a hivemind.DHT."""
    ctx = mp.get_context("fork")
    address_queue, stop_queue, trunk_results, owner_results = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    # not daemonic: a hivemind.DHT runs in a child process of its own
    trunk = ctx.Process(target=_dht_trunk_process, args=(address_queue, stop_queue, trunk_results))
    trunk.start()
    owner = None
    try:
        trunk_peer, maddrs = address_queue.get(timeout=60)
        owner = ctx.Process(target=_dht_owner_process, args=(trunk_peer, maddrs, owner_results))
        owner.start()
        result = owner_results.get(timeout=240)
        stop_queue.put(True)
        trunk_stats = trunk_results.get(timeout=30)
    finally:
        stop_queue.put(True)
        for process in (owner, trunk):
            if process is not None:
                process.join(30)
                if process.is_alive():
                    process.terminate()
                    process.join(5)
    steps = 5 * (len(load_digits_splits(seed=0).private_x) // BATCH)
    assert result["stats"]["steps"] == steps and result["stats"]["dropped"] == 0
    assert trunk_stats["steps"] == steps and trunk_stats["rejected"] == 0
    assert np.mean(result["losses"][-5:]) < 0.85 * np.mean(result["losses"][:5])
