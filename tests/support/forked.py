"""Peers forked from the test process that build hivemind averagers and optimizers directly (the
``swarmtrain`` command line is ``support.swarm``'s job). hivemind needs ``fork``; every peer gets one
torch thread (OpenMP pools inherited from a parent that already ran parallel ops are not fork-safe,
and 2 shared cores gain nothing from more).

    def _peer(peers, rank, spec):               # runs in the forked process
        dht = peers.start_dht(rank)
        try:
            ...
            peers.report(rank, numpy_results)   # numpy, not tensors, through the queue
            peers.wait_until_done()             # keep serving until every peer has reported
        finally:
            dht.shutdown()

    results = ForkedPeers(3).run(_peer, "gaussiank:0.01", timeout=120)   # {rank: result}
"""
from __future__ import annotations

import multiprocessing as mp
import queue
from typing import Callable, Dict, Optional, Sequence, Tuple

import hivemind
import torch

from swarmtrain.compression.factory import make_averager_factory
from swarmtrain.compression.spec import parse_compression_spec


class PeerCrashed(AssertionError):
    pass


class ForkedPeers:
    """What forked peers share: the first peer's DHT address, a barrier, a done event, the results."""

    def __init__(self, num_peers: int):
        context = mp.get_context("fork")
        self.num_peers, self.context = num_peers, context
        self.addresses, self.results = context.Queue(), context.Queue()
        self.barrier, self.done = context.Barrier(num_peers), context.Event()
        self.processes = []

    # -------------------------------------------------------------- inside a peer
    def start_dht(self, rank: int, host: str = "127.0.0.1") -> hivemind.DHT:
        """A DHT on ``host`` (127.0.0.1; a benchmark's peers in network namespaces: their own address):
        peer 0 starts the swarm, the others join through it."""
        options = dict(host_maddrs=[f"/ip4/{host}/tcp/0"], client_mode=False, start=True)
        if rank == 0:
            dht = hivemind.DHT(**options)
            for _ in range(self.num_peers - 1):
                self.addresses.put([str(address) for address in dht.get_visible_maddrs()])
            return dht
        return hivemind.DHT(initial_peers=self.addresses.get(timeout=60), **options)

    def report(self, rank: int, result) -> None:
        self.results.put((rank, result, None))

    def wait_until_done(self, timeout: float = 60.0) -> None:
        self.done.wait(timeout)

    # -------------------------------------------------------------- in the test
    def run(self, target: Callable, *args, timeout: float, expect: Optional[Sequence[int]] = None,
            join_timeout: float = 30.0) -> Dict[int, object]:
        """Fork one process per rank running ``target(self, rank, *args)`` and collect what the peers
        in `expect` (default: all) report within `timeout` seconds; a peer that crashed or never
        reported fails the test."""
        expect = list(range(self.num_peers)) if expect is None else list(expect)
        self.processes = [self.context.Process(target=_peer_main, args=(self, rank, target, args))
                          for rank in range(self.num_peers)]
        for process in self.processes:
            process.start()
        results = {}
        try:
            while len(results) < len(expect):
                rank, result, error = self.results.get(timeout=timeout)
                if error is not None:
                    raise PeerCrashed(f"peer {rank} crashed: {error}")
                results[rank] = result
        except queue.Empty:
            raise AssertionError(f"peers {sorted(set(expect) - set(results))} did not report in {timeout} s") from None
        finally:
            self.done.set()
            for process in self.processes:
                process.join(timeout=join_timeout)
                if process.is_alive():
                    process.kill()
        return results


def _peer_main(peers: ForkedPeers, rank: int, target: Callable, args) -> None:
    torch.set_num_threads(1)
    try:
        target(peers, rank, *args)
    except BaseException as error:
        peers.results.put((rank, None, repr(error)))


def make_test_averager(spec: str, dht, *, prefix: str, num_peers: int, min_group_size: int, numel: int = 60_000,
                       **options):
    """Two parameters (a matrix and a vector) and a gradient averager for `spec` over them, with the
    loopback timeouts that keep every round whole on 2 cores. ``options``: more averager arguments
    (e.g. ``ban_list``, ``round_checks``, ``client_mode``)."""
    parameters = [torch.nn.Parameter(torch.zeros(numel // 3, 3)), torch.nn.Parameter(torch.zeros(numel // 2))]
    client_mode = options.pop("client_mode", False)  # True: an averager nobody can dial (behind NAT)
    # (a benchmark behind slow links passes longer ones)
    timeouts = dict(request_timeout=options.pop("request_timeout", 1.0),
                    next_chunk_timeout=options.pop("next_chunk_timeout", 3.0))
    averager = make_averager_factory(parse_compression_spec(spec), **options)(
        parameters=parameters, dht=dht, prefix=prefix, min_matchmaking_time=2.0, target_group_size=num_peers,
        min_group_size=min_group_size, client_mode=client_mode, start=True, **timeouts,
    )
    return parameters, averager


def accumulate_random_gradients(averager, parameters, generator, rank) -> torch.Tensor:
    """Heavy-tailed, peer-specific gradients of different scales, accumulated once; returned flat."""
    raw = []
    for parameter in parameters:
        grad = torch.randn(parameter.shape, generator=generator) ** 3 * (1 + rank)
        parameter.grad = grad.clone()
        raw.append(grad.reshape(-1))
    averager.accumulate_grads_(batch_size=4)
    return torch.cat(raw)


def step_and_take_applied(averager, timeout: float) -> Tuple[bool, torch.Tensor]:
    """One averaging round; (whether it succeeded, the flat gradient this peer would apply: the group's
    average, or its own when the round failed). The accumulators are reset for the next round."""
    try:
        averager.step(timeout=timeout)
        ok = True
    except Exception:
        ok = False
    with averager.use_averaged_gradients() as grads:
        applied = torch.cat([grad.reshape(-1) for grad in grads]).clone()
    averager.reset_accumulated_grads_()
    return ok, applied
