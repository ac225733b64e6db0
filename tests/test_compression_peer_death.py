"""A peer dies in the middle of a sparse (gaussiank) averaging round, as a volunteer's machine does.

hivemind's own averager lets the rest of the group fail or finish that round and go on averaging
without the dead peer. The sparse averager must do the same: the survivors' step returns (no hang,
no crash), a failed round leaves their error-feedback residuals untouched (no gradient mass lost or
double-counted), and the next rounds succeed in the smaller group with bit-identical averages and
exact conservation. The peer is killed with SIGKILL together with its DHT, its averager process and
their p2p daemons (its own process group) when the first part for the span it reduces arrives.
"""
import os
import signal

import numpy as np
import pytest
import torch

from swarmtrain.compression.sparse_round import SparseAllReduceRound
from tests.support.forked import ForkedPeers, accumulate_random_gradients, make_test_averager

NUM_PEERS, DYING_RANK, ROUNDS = 3, 2, 5
NUMEL = 30_000
DIE_IN_ROUND = 1  # the dying peer completes one round (its first group), then dies during its second


def _die_mid_round():
    """Patch the reducer side (before the averager process forks, so the patch is inherited): in the
    round DIE_IN_ROUND, when the first part from another peer arrives for our span, SIGKILL the whole
    process group. The group is formed and the all-reduce under way; the span we reduce is never
    answered, so the survivors cannot finish that round with the parts they had."""
    honest_rpc = SparseAllReduceRound.rpc_aggregate_part
    rounds_seen = [0]

    async def rpc_then_die(self, stream, context):
        if not hasattr(self, "_test_round_index"):  # this process's rounds, in order
            self._test_round_index, rounds_seen[0] = rounds_seen[0], rounds_seen[0] + 1
        if self._test_round_index == DIE_IN_ROUND:
            os.killpg(os.getpgid(0), signal.SIGKILL)  # no goodbye: DHT, averager and p2pd go at once
        async for message in honest_rpc(self, stream, context):
            yield message

    SparseAllReduceRound.rpc_aggregate_part = rpc_then_die


def _peer(peers, rank):
    if rank == DYING_RANK:
        os.setsid()  # its DHT, averager and p2p daemons inherit this group: one killpg ends them all
        _die_mid_round()
    dht = averager = None
    try:
        dht = peers.start_dht(rank)
        parameters, averager = make_test_averager("gaussiank:0.01", dht, prefix="peer_death_test", num_peers=NUM_PEERS,
                                                  min_group_size=2, numel=NUMEL)
        generator = torch.Generator().manual_seed(100 + rank)
        peers.barrier.wait(60)  # every averager is up: the first round can include everyone
        log = []
        for _ in range(ROUNDS):
            raw = accumulate_random_gradients(averager, parameters, generator, rank)
            residual_before = averager.residual.numpy().copy()
            members = []  # ranks in our group; [] when the round failed
            try:
                members = sorted(averager.step(timeout=45, gather=rank).values())
            except Exception:
                pass
            with averager.use_averaged_gradients() as grads:
                applied = torch.cat([grad.reshape(-1) for grad in grads]).clone()
            averager.reset_accumulated_grads_()
            log.append(dict(raw=raw.numpy(), applied=applied.numpy(), members=members,
                            residual_before=residual_before, residual_after=averager.residual.numpy().copy()))
        peers.report(rank, log)
        peers.wait_until_done(60)  # keep serving until every survivor has its results
    finally:
        if averager is not None:
            averager.shutdown()
        if dht is not None:
            dht.shutdown()


@pytest.mark.slow
def test_survivors_carry_on_after_a_peer_dies_mid_round():
    survivors = [rank for rank in range(NUM_PEERS) if rank != DYING_RANK]
    peers = ForkedPeers(NUM_PEERS)
    try:
        results = peers.run(_peer, timeout=60 + 60 * ROUNDS, expect=survivors)
    finally:
        try:  # whatever is left of the dying peer's group (it should be gone already)
            os.killpg(peers.processes[DYING_RANK].pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    assert peers.processes[DYING_RANK].exitcode == -signal.SIGKILL, "the dying peer did not die mid-round"
    logs = [results[rank] for rank in survivors]
    groups = [[entry["members"] for entry in log] for log in logs]
    print("groups per round:", groups)

    # the dying peer averaged with the survivors before it died (the set-up works before the failure)
    with_dying = [index for index in range(ROUNDS) if any(DYING_RANK in log[index] for log in groups)]
    assert with_dying, "the dying peer never averaged with the survivors"
    last_with_dying = max(with_dying)
    # afterwards each survivor's step returned: failed ([]), or finished without the dead peer (hivemind
    # retries within a step); and the last rounds bring the survivors together again
    for log in groups:
        assert all(members in ([], survivors) for members in log[last_with_dying + 1:]), log
        assert log[-2:] == [survivors, survivors], log
    for round_index in range(ROUNDS):
        entries = [log[round_index] for log in logs]
        for entry in entries:
            if entry["members"] == []:
                # failed: the residual is exactly as before (the gradient stays local, nothing committed)
                assert np.array_equal(entry["residual_after"], entry["residual_before"])
                np.testing.assert_array_equal(entry["applied"], entry["raw"])
        if [entry["members"] for entry in entries] != [survivors, survivors]:
            continue
        assert np.array_equal(entries[0]["applied"], entries[1]["applied"]), f"round {round_index}: averages differ"
        # error feedback among the survivors: n * applied + Σ Δresidual == Σ raw
        raw = sum(entry["raw"].astype(np.float64) for entry in entries)
        residual_change = sum(entry["residual_after"].astype(np.float64) - entry["residual_before"]
                              for entry in entries)
        scale = np.abs(raw).max()
        np.testing.assert_allclose(len(entries) * entries[0]["applied"].astype(np.float64) + residual_change, raw,
                                   atol=1e-5 * scale, rtol=0)
        assert 0 < np.count_nonzero(entries[0]["applied"]) < 0.05 * NUMEL  # still sparse
