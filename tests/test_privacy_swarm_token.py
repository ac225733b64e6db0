"""A token-gated split run on loopback (issue #5 with the access tokens of issue #7).

Coordinator (access.mode: token) and `swarmtrain peer` processes, each with a token the test issues
with the coordinator's key: trunk host A, a data owner that trains through it, and trunk host B that
joins after the owner has finished. Meanwhile a rogue helper process (this file, `python -m
tests.test_privacy_swarm_token rogue ...`) with plain hivemind and no token dials A directly and
calls its split RPCs with well-formed requests, its trunk state download and its averaging.

Asserts: the owner trains; every call of the rogue is refused (and A took no step for it); B, which
holds a token, downloads the trained trunk from A through the same guarded download before it
serves (its trunk is A's, not the seeded initial one).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.support.swarm import count_state_download_messages

REPO = Path(__file__).resolve().parent.parent
RUN_ID = "split-token-test"
CUT_WIDTH = 16
OWNER_STEPS = 120
HOUR = 3600.0
CONFIG = {
    "run_id": RUN_ID,
    "seed": 0,
    "target_batch_size": 32,
    "averaging": {"matchmaking_time": 2.0, "request_timeout": 1.0},
    "access": {"mode": "token"},
    "privacy": {"enabled": True, "alpha": 0.3,
                "split": {"cut_width": CUT_WIDTH, "hidden": 64, "trunk_hidden": 64, "batch_size": 32, "lr": 0.003,
                          "average_every": 3.0, "averaging_timeout": 10.0}},
}


def _key_and_id(path: Path):
    from swarmtrain.net.identity import load_or_create_identity, peer_id_of

    key = load_or_create_identity(path)
    return key, peer_id_of(key.get_public_key())


@pytest.fixture(scope="module")
def token_split_swarm(tmp_path_factory):
    from swarmtrain.access.tokens import issue_token
    from swarmtrain.demo import free_port
    from tests.support.swarm import LocalSwarm

    workdir = tmp_path_factory.mktemp("token-split")
    (workdir / "split.yaml").write_text(yaml.safe_dump(CONFIG))
    coordinator_key, _ = _key_and_id(workdir / "coordinator.id")  # start_coordinator uses this identity

    def member(index: int, name: str):
        identity = workdir / f"{name}.id"
        token = issue_token(coordinator_key, name, _key_and_id(identity)[1], time.time() + HOUR).to_text()
        return ("--identity", str(identity), "--token", token)

    swarm = LocalSwarm(workdir, workdir / "split.yaml")
    rogue = None
    try:
        port_a = free_port()
        swarm.start_peer(0, "--role", "trunk", *member(0, "trunk-a"), "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port_a}")
        swarm.wait_until(lambda: swarm.status(0).get("phase") == "hosting trunk", 240, "trunk host A")
        trunk_a = f"/ip4/127.0.0.1/tcp/{port_a}/p2p/{swarm.status(0)['peer_id']}"
        swarm.start_peer(1, "--role", "data-owner", "--max-steps", str(OWNER_STEPS), *member(1, "owner"))
        # the rogue goes at A once A shares a trained trunk (so only the token check can refuse the download)
        swarm.wait_until(lambda: swarm.status(0).get("sharing_trunk"), 240, "A taking the owner's steps")
        env = dict(os.environ, HIVEMIND_LOGLEVEL="ERROR")
        rogue = subprocess.Popen([sys.executable, "-m", "tests.test_privacy_swarm_token", "rogue", trunk_a, RUN_ID],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True, env=env)
        rogue_output, _ = rogue.communicate(timeout=180)
        assert rogue.returncode == 0 and "RESULT " in rogue_output, rogue_output[-4000:]
        rogue_result = json.loads(rogue_output.split("RESULT ", 1)[1].splitlines()[0])
        swarm.wait_for_exit([1], timeout=300)
        steps_a = swarm.status(0).get("step")
        time.sleep(1.5)  # A writes its status every second: its trunk is final now (no owner, alone)
        a_after_owner = swarm.status(0)
        # B joins late, after the owner trained through A
        swarm.start_peer(2, "--role", "trunk", *member(2, "trunk-b"))
        swarm.wait_until(lambda: swarm.status(2).get("phase") == "hosting trunk", 240, "trunk host B")
        yield SimpleNamespace(owner=swarm.status(1), a=a_after_owner, steps_a=steps_a, b=swarm.status(2),
                              rogue=rogue_result, logs={i: swarm.log(i) for i in (0, 1, 2)})
    finally:
        if rogue is not None and rogue.poll() is None:
            os.killpg(rogue.pid, 9)
        swarm.close()


def test_an_authorized_data_owner_trains_through_a_token_gated_trunk(token_split_swarm):
    owner, a = token_split_swarm.owner, token_split_swarm.a
    assert owner["phase"] == "finished" and owner["step"] == OWNER_STEPS, owner
    assert owner["test_accuracy"] > 0.2, owner  # chance is 0.10
    assert a["step"] == token_split_swarm.steps_a >= OWNER_STEPS and a["rejected"] == 0, a
    for index, log in token_split_swarm.logs.items():
        assert "Traceback" not in log, (index, log[-3000:])


def test_a_caller_without_a_token_is_refused_by_the_trunk_host(token_split_swarm):
    rogue, a = token_split_swarm.rogue, token_split_swarm.a
    for call in ("train", "eval"):
        assert rogue[call].startswith("refused") and "no valid access token" in rogue[call], rogue
    assert rogue["download_messages"] == 0 and rogue["join"] == "PROTOCOL_VIOLATION", rogue
    # A counted the two split calls as unauthorized, took no step for them, and logged who it refused
    assert a["unauthorized"] >= 2 and a["step"] <= OWNER_STEPS + token_split_swarm.owner.get("dropped", 0), a
    log = token_split_swarm.logs[0]
    assert f"refused a split training step from peer {rogue['peer_id']}" in log, log[-3000:]
    assert f"refused rpc_download_state from peer {rogue['peer_id']}" in log, log[-3000:]


def test_a_late_trunk_host_with_a_token_starts_from_the_trained_trunk(token_split_swarm):
    a, b = token_split_swarm.a, token_split_swarm.b
    assert b["loaded_trunk"] is True, b
    assert b["initial_trunk_norm"] == pytest.approx(a["initial_trunk_norm"], rel=1e-9)  # the same seeded init
    assert abs(b["loaded_trunk_norm"] - b["initial_trunk_norm"]) > 1e-3, b  # not the initial trunk...
    assert b["loaded_trunk_norm"] == pytest.approx(a["trunk_norm"], rel=1e-5), (a, b)  # ...but A's trained one
    assert "could not load the current trunk" not in token_split_swarm.logs[2]


# --------------------------------------------------------------------------------------------
# the rogue helper process: plain hivemind, no token, dials the trunk host directly
# --------------------------------------------------------------------------------------------


async def _rogue(trunk_maddr: str, run_id: str) -> dict:
    import torch
    from hivemind.p2p import P2P, PeerID
    from hivemind.proto import averaging_pb2, runtime_pb2
    from hivemind.utils import MSGPackSerializer, get_dht_time
    from hivemind.utils.asyncio import anext

    from swarmtrain.privacy.split import SPLIT_PROTOCOL_VERSION, _serialize, handler_names
    from swarmtrain.privacy.trunk_host import TrunkStateAverager

    p2p = await P2P.create(initial_peers=[trunk_maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    trunk = PeerID.from_base58(trunk_maddr.rsplit("/p2p/", 1)[1])
    out = {"peer_id": str(p2p.peer_id)}
    try:
        train, evaluate = handler_names(run_id)
        z = torch.randn(8, CUT_WIDTH).relu()  # well-formed: only the token check can refuse these
        labels = torch.randint(0, 10, (8,))
        meta = MSGPackSerializer.dumps({"version": SPLIT_PROTOCOL_VERSION})
        for call, name, tensors in (("train", train, [z, labels]), ("eval", evaluate, [z])):
            request = runtime_pb2.ExpertRequest(tensors=[_serialize(t) for t in tensors], metadata=meta)
            try:
                await asyncio.wait_for(p2p.call_protobuf_handler(trunk, name, request, runtime_pb2.ExpertResponse), 30)
                out[call] = "answered"
            except Exception as error:
                out[call] = f"refused: {type(error).__name__}: {error}"
        stub = TrunkStateAverager.get_stub(p2p, trunk, namespace=f"{run_id}_trunk")
        out.update(await count_state_download_messages(stub))
        try:
            stream = await stub.rpc_join_group(averaging_pb2.JoinRequest(
                schema_hash=b"rogue", expiration=get_dht_time() + 10, group_key=f"{run_id}_trunk.0b"))
            out["join"] = averaging_pb2.MessageCode.Name((await asyncio.wait_for(anext(stream), 30)).code)
        except Exception as error:
            out["join"] = f"error {error!r}"
    finally:
        await p2p.shutdown()
    return out


if __name__ == "__main__" and sys.argv[1] == "rogue":
    print("RESULT " + json.dumps(asyncio.run(_rogue(sys.argv[2], sys.argv[3]))), flush=True)
