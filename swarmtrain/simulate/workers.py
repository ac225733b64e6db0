"""The replicas' forward and backward passes in forked worker processes, one core each.

Measured on the tiny config (2-layer GPT-2, batch 8 x 64 tokens), a local step is compute-bound: ~90%
of it is the model's forward and backward (matrix products, tanh, dropout draws), not Python or per-op
overhead. Batching the N replicas into one computation (``torch.func.vmap`` over stacked parameters)
was measured not faster at one thread and not faster at two (the attention kernel has no batching rule,
and the batched matrix products cost what the separate ones do), and it changes the float rounding of
every matrix product. What can speed the simulation up is the machine's other cores, as the real
swarm's peer processes use them: the replicas are split between this process and forked workers.

What runs where keeps the simulation exact (the same floats as the in-process path, see
tests/test_simulate.py): a forked worker only computes a replica's loss, backward and gradient clipping
(``Trainee.backward``), on the replica's own model, whose parameters live in shared memory; the main
process keeps everything else -- data order, optimizer, scheduler, averaging -- and hands each worker
the batches of its replicas. A replica always goes to the same worker, which holds its dropout
generator and masking generator (``Replica.backward``), so every peer's draws are its own stream, as
they are in the in-process path.
"""
from __future__ import annotations

import multiprocessing
import signal
from typing import Dict, List, Optional, Sequence

import torch

from swarmtrain.simulate.replicas import Replica, Trainee

JOIN_TIMEOUT = 10.0  # seconds a worker gets to exit after the last command before it is terminated


def _serve(connection, replicas: Sequence[Replica], trainees: Dict[int, Trainee],
           gradients: Dict[int, List[torch.Tensor]]) -> None:
    """A worker's loop. A command is a list of (replica index, batches, summing): the replica's backward
    on each batch, on its trainee; the gradients go to the replica's shared buffers -- the last step's,
    or with `summing` (mode sync) the sum over the steps, added up as Replica._accumulate does. The
    losses go back, per command item."""
    torch.set_num_threads(1)  # one core per worker; forked children must not use the parent's thread pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the main process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        while True:
            command = connection.recv()
            if command is None:
                return
            connection.send([_steps(replicas[index], trainees[index], batches, summing, gradients[index])
                             for index, batches, summing in command])
    except (EOFError, BrokenPipeError):
        return


def _steps(replica: Replica, trainee: Trainee, batches: Sequence, summing: bool,
           buffers: List[torch.Tensor]) -> List[Optional[float]]:
    losses, total = [], None
    for batch in batches:
        loss = replica.backward(trainee, torch.from_numpy(batch))
        if loss is not None:
            grads = [param.grad.detach() for param in trainee.parameters]
            if not summing:
                for buffer, grad in zip(buffers, grads):
                    buffer.copy_(grad)
            elif total is None:
                total = [grad.clone() for grad in grads]
            else:
                for summed, grad in zip(total, grads):
                    summed.add_(grad)
        for param in trainee.parameters:
            param.grad = None
        losses.append(loss)
    if total is not None:
        for buffer, summed in zip(buffers, total):
            buffer.copy_(summed)
    return losses


class StepWorkers:
    """Worker processes that run the replicas' backward passes (see the module docstring).

    Construct it after the replicas and their trainees exist: their parameters are moved to shared
    memory (in place: the optimizers keep them), then the workers are forked. ``close`` ends them.

    :param replicas: the simulation's replicas, all of them (replica i goes to worker i mod workers)
    :param shared: mode sync's trainee, which every replica computes its gradient on (None in mode local,
      where each replica has its own)
    :param workers: number of processes computing, this one included (workers - 1 are forked): worker 0
      is this process, which computes its replicas while the others compute theirs -- one process fewer
      competing for the cores than an idle coordinator would make
    """

    def __init__(self, replicas: Sequence[Replica], shared: Optional[Trainee], workers: int):
        self.replicas = list(replicas)
        self.trainees = {r.index: shared if shared is not None else r.trainee for r in self.replicas}
        for trainee in {id(t): t for t in self.trainees.values()}.values():
            for param in trainee.parameters:
                param.share_memory_()
        self.gradients = {index: [torch.zeros_like(p).share_memory_() for p in trainee.parameters]
                          for index, trainee in self.trainees.items()}
        self.summed: Dict[Replica, bool] = {}
        context = multiprocessing.get_context("fork")
        self.connections, self.processes = [], []
        for _ in range(1, workers):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, self.replicas, self.trainees, self.gradients),
                                      daemon=True)
            process.start()
            theirs.close()
            self.connections.append(ours)
            self.processes.append(process)

    def backward(self, stepping: Sequence[Replica]) -> List[Optional[float]]:
        """Each stepping replica's backward on its next batch (drawn here, in order); the losses, in
        order (None: a non-finite loss, no gradient). ``install_gradients`` then hands a replica's
        gradients to its trainee."""
        losses = self._run({replica: [replica.next_batch()] for replica in stepping}, summing=False)
        return [losses[replica][0] for replica in stepping]

    def accumulate(self, ticks: Sequence[Sequence[Replica]]) -> Dict[Replica, List[Optional[float]]]:
        """Mode sync: the replicas stepping in each of `ticks` take their steps, each replica's gradients
        summed over them (``accumulated``); per replica, the losses of its steps in order."""
        batches: Dict[Replica, list] = {}
        for stepping in ticks:
            for replica in stepping:
                batches.setdefault(replica, []).append(replica.next_batch())
        losses = self._run(batches, summing=True)
        self.summed = {replica: any(loss is not None for loss in replica_losses)
                       for replica, replica_losses in losses.items()}
        return losses

    def accumulated(self, replica: Replica) -> Optional[List[torch.Tensor]]:
        """The sum of the replica's gradients over its steps in the last ``accumulate`` (views of the
        shared buffers), None if none of them was finite."""
        return self.gradients[replica.index] if self.summed.get(replica) else None

    def _run(self, batches: Dict[Replica, list], summing: bool) -> Dict[Replica, List[Optional[float]]]:
        commands: List[list] = [[] for _ in range(len(self.connections) + 1)]
        for replica, replica_batches in batches.items():
            # numpy: a tensor sent through a pipe would be moved to a new shared-memory segment every time
            commands[replica.index % len(commands)].append((replica, [batch.numpy() for batch in replica_batches]))
        busy = [(worker, command) for worker, command in enumerate(commands) if command and worker > 0]
        for worker, command in busy:
            self.connections[worker - 1].send([(replica.index, items, summing) for replica, items in command])
        losses: Dict[Replica, List[Optional[float]]] = {}
        for replica, items in commands[0]:  # this process's share, meanwhile
            losses[replica] = _steps(replica, self.trainees[replica.index], items, summing,
                                     self.gradients[replica.index])
        for worker, command in busy:
            for (replica, _), replica_losses in zip(command, self.connections[worker - 1].recv()):
                losses[replica] = replica_losses
        return losses

    def install_gradients(self, replica: Replica) -> None:
        """The replica's gradients from its last backward as its trainee's ``.grad`` (views of the
        shared buffers: valid until the replica's next backward)."""
        for param, buffer in zip(self.trainees[replica.index].parameters, self.gradients[replica.index]):
            param.grad = buffer

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
            connection.close()
        for process in self.processes:
            process.join(JOIN_TIMEOUT)
            if process.is_alive():
                process.terminate()
                process.join()
