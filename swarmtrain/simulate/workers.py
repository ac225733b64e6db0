"""The replicas' forward and backward passes in forked worker processes, one core each.

Measured on the tiny config (2-layer GPT-2, batch 8 x 64 tokens), a local step is compute-bound: ~90%
of it is the model's forward and backward (matrix products, tanh, dropout draws), not Python or per-op
overhead. Batching the N replicas into one computation (``torch.func.vmap`` over stacked parameters)
was measured not faster at one thread and not faster at two (the attention kernel has no batching rule,
and the batched matrix products cost what the separate ones do), and it changes the float rounding of
every matrix product. What does speed the simulation up is the machine's other cores, as the real
swarm's peer processes use them: the replicas are split between worker processes.

What runs where keeps the simulation exact (the same floats as the in-process path, see
tests/test_simulate.py): a worker only computes a replica's loss, backward and gradient clipping
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
    """A worker's loop: for each (replica index, batch) of a command, the replica's backward on its
    trainee, the gradients copied to the replica's shared buffers; the losses go back."""
    torch.set_num_threads(1)  # one core per worker; forked children must not use the parent's thread pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the main process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        while True:
            command = connection.recv()
            if command is None:
                return
            losses = []
            for index, batch in command:
                trainee = trainees[index]
                loss = replicas[index].backward(trainee, torch.from_numpy(batch))
                if loss is not None:
                    for buffer, param in zip(gradients[index], trainee.parameters):
                        buffer.copy_(param.grad)
                for param in trainee.parameters:
                    param.grad = None
                losses.append(loss)
            connection.send(losses)
    except (EOFError, BrokenPipeError):
        return


class StepWorkers:
    """Worker processes that run the replicas' backward passes (see the module docstring).

    Construct it after the replicas and their trainees exist: their parameters are moved to shared
    memory (in place: the optimizers keep them), then the workers are forked. ``close`` ends them.

    :param replicas: the simulation's replicas, all of them (replica i goes to worker i mod workers)
    :param shared: mode sync's trainee, which every replica computes its gradient on (None in mode local,
      where each replica has its own)
    :param workers: number of worker processes (at least 2; one is the in-process path)
    """

    def __init__(self, replicas: Sequence[Replica], shared: Optional[Trainee], workers: int):
        self.replicas = list(replicas)
        self.trainees = {r.index: shared if shared is not None else r.trainee for r in self.replicas}
        for trainee in {id(t): t for t in self.trainees.values()}.values():
            for param in trainee.parameters:
                param.share_memory_()
        self.gradients = {index: [torch.zeros_like(p).share_memory_() for p in trainee.parameters]
                          for index, trainee in self.trainees.items()}
        context = multiprocessing.get_context("fork")
        self.connections, self.processes = [], []
        for _ in range(workers):
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
        commands: List[list] = [[] for _ in self.connections]
        for replica in stepping:
            # numpy: a tensor sent through a pipe would be moved to a new shared-memory segment every time
            commands[replica.index % len(self.connections)].append((replica.index, replica.next_batch().numpy()))
        busy = [(worker, command) for worker, command in enumerate(commands) if command]
        for worker, command in busy:
            self.connections[worker].send(command)
        losses: Dict[int, Optional[float]] = {}
        for worker, command in busy:
            for (index, _), loss in zip(command, self.connections[worker].recv()):
                losses[index] = loss
        return [losses[replica.index] for replica in stepping]

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
