"""What a training peer of a run will need in memory, for `swarmtrain doctor`.

A peer's memory is mostly not its model: on a CPU, the tiny demo run's peer holds ~0.7 GB (PSS over its
processes) for a 0.1M-parameter model, and an ALBERT-base peer several GB for 12M parameters, because
- the runtime (Python with torch, hivemind and transformers loaded) costs hundreds of MB: measured here
  as this process's own resident memory once those are imported, plus the helper processes a peer
  starts (its DHT process, the p2p daemon, the averagers; HELPER_PROCESSES_BYTES);
- one training step keeps every activation autograd saves for the backward pass: for ALBERT at
  seq_len 512 that is hundreds of MB per sample. Counted here on the run's real model, run on the
  meta device at the batch the peer will use (activation_bytes);
- the data loader: a bounded window of the corpus, the same for a 1 MB or a 1 TB one (swarmtrain.data
  streams it: ``loader_memory_bytes``);
- the model, its gradients and hivemind's optimizer buffers (swarmtrain.peer.resources.memory_needed).

benchmarks/peer_memory.py compares the total with a real peer's measured peak (tiny and ALBERT configs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# the DHT process, the p2p daemon and the averager processes of a peer, beyond its main process (PSS):
# calibrated on the tiny run's peer by benchmarks/peer_memory.py, where they are most of what the
# main process's own resident memory does not account for
HELPER_PROCESSES_BYTES = 200 * 1024 ** 2


@dataclass
class MemoryEstimate:
    """A peer's memory needs, by part (bytes).

    :param runtime: the interpreter with the training stack loaded, and the peer's helper processes
    :param model_and_optimizer: on the host: weights, gradients and hivemind's buffers and state
    :param activations: what one step at `batch_size` samples keeps for its backward pass
    :param corpus: the training data in memory (the data loader's bound; it does not grow with the corpus)
    :param batch_size: samples per local step the estimate assumes
    :param num_params: parameters of the run's model
    :param device_bytes: on a GPU: what the model, its optimizer buffers and one sample's step need there
    """

    runtime: int
    model_and_optimizer: int
    activations: int
    corpus: int
    batch_size: int
    num_params: int
    device_bytes: int = 0

    @property
    def host_bytes(self) -> int:
        return self.runtime + self.model_and_optimizer + self.activations + self.corpus


def own_resident_bytes() -> int:
    """This process's resident memory now (its runtime, once torch and hivemind are imported)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def activation_bytes(config, batch_size: int) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one step of `batch_size` samples
    (parameters excluded), from a forward pass of the run's real model on the meta device: shapes
    without data, so it costs milliseconds even for ALBERT at seq_len 512 (a real CPU probe costs
    seconds per sample). The masked LM is given labels at every position: its logits are computed
    at every position either way."""
    import torch

    from swarmtrain.data import pinned_vocabulary
    from swarmtrain.models import build_model

    with torch.device("meta"):  # (sized by the tokenizer's vocabulary: the published config carries it)
        model = build_model(config.model, config.data.seq_len, config.seed, pinned_vocabulary(config.data))
    parameters = {id(parameter.untyped_storage()) for parameter in model.parameters()}
    saved = {}  # storage id -> bytes; views of one storage share it (its Python object is preserved)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if id(storage) not in parameters:
            saved[id(storage)] = (storage, storage.nbytes())  # the storage kept alive: its id stays its own
        return tensor

    tokens = torch.zeros(batch_size, config.data.seq_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=tokens, labels=tokens)
    return sum(size for _, size in saved.values())


def estimate_peer_memory(config, device: str, data_path: Optional[str] = None,
                         batch_size: Optional[int] = None) -> MemoryEstimate:
    """The memory a peer of this run needs on this machine (see the module docstring). On a GPU the
    batch is sized to its memory, so the device figure is for one sample per step. (``data_path``, the
    peer's --data, does not change it: the data is streamed, its memory bounded whatever its size.)"""
    from swarmtrain.peer.resources import CPU_DEFAULT_BATCH, count_parameters, memory_needed

    num_params = count_parameters(config)
    on_device, on_host = memory_needed(num_params, config.optimizer.eight_bit, device)
    batch_size = batch_size or (CPU_DEFAULT_BATCH if device == "cpu" else 1)
    activations = activation_bytes(config, batch_size)
    from swarmtrain.data.stream import loader_memory_bytes

    corpus = loader_memory_bytes(config.data.seq_len, config.data.heldout_blocks)
    runtime = own_resident_bytes() + HELPER_PROCESSES_BYTES
    if device == "cpu":
        return MemoryEstimate(runtime, on_host, activations, corpus, batch_size, num_params)
    return MemoryEstimate(runtime, on_host, 0, corpus, batch_size, num_params, device_bytes=on_device + activations)
