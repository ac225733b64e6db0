"""A real local swarm for tests: coordinator and peers as `swarmtrain` processes on 127.0.0.1."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from swarmtrain.training.checkpoint import load_checkpoint
from swarmtrain.demo import start_coordinator, start_peer, stop_process


class LocalSwarm:
    def __init__(self, workdir: Path, config_path: Path, **coordinator_options):
        self.workdir = workdir
        self.config_path = config_path
        self.coordinator, self.maddr = start_coordinator(workdir, config_path, **coordinator_options)
        self.peers: Dict[int, subprocess.Popen] = {}

    def start_peer(self, index: int, *extra: str, **options) -> subprocess.Popen:
        """options: those of swarmtrain.demo.start_peer, e.g. command= for a modified peer program.
        One CPU thread per peer by default: tests run several peers on 2 cores."""
        options.setdefault("threads", 1)
        self.peers[index] = start_peer(self.workdir, index, self.maddr, "--device", "cpu", *extra, **options)
        return self.peers[index]

    def start_liar_once_the_pair_met(self, index: int, command, pair_timeout: float, join_timeout: float) -> str:
        """Start peer ``index`` with a modified peer program (a lying reducer) once peers 0 and 1 have had
        a round together, and return its peer ID once it has joined."""
        self.wait_until(lambda: all(any(r["ok"] and r["group_size"] == 2 for r in self.rounds(i)) for i in (0, 1)),
                        pair_timeout, "the honest peers' first round together")
        self.start_peer(index, "--eval-every", "0", command=command)
        self.wait_until(lambda: self.status(index).get("peer_id") is not None, join_timeout, "the liar to join")
        return self.status(index)["peer_id"]

    def status(self, index: int) -> dict:
        try:
            return json.loads((self.workdir / f"peer-{index}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def log(self, index) -> str:
        name = "coordinator" if index == "coordinator" else f"peer-{index}"
        return (self.workdir / f"{name}.log").read_text()

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for index, process in self.peers.items():
                code = process.poll()
                if code not in (None, 0, -signal.SIGKILL, -signal.SIGINT):
                    raise AssertionError(f"peer-{index} exited with {code}:\n{self.log(index)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; statuses: "
                                     f"{ {i: (self.status(i).get('phase'), self.status(i).get('epoch')) for i in self.peers} }")
            time.sleep(0.5)

    def wait_for_exit(self, indices: List[int], timeout: float) -> None:
        for index in indices:
            code = self.peers[index].wait(timeout)
            assert code == 0, f"peer-{index} exited with {code}:\n{self.log(index)[-3000:]}"

    def final_parameters(self, index: int) -> Dict[str, torch.Tensor]:
        return load_checkpoint(self.workdir / f"peer-{index}").model_state

    def rounds(self, index: int) -> List[dict]:
        return self.status(index).get("rounds", [])

    def why_apart(self, indices) -> str:
        """What a failure message needs when peers end apart: each one's rounds, resyncs and warnings."""
        lines = []
        for index in indices:
            status = self.status(index)
            lines.append(f"peer-{index}: resyncs {status.get('resyncs')}, rounds "
                         f"{[(r['epoch'], r['group_size'], r['note'] or 'ok') for r in status.get('rounds', [])]}")
            lines += [f"  {line[:200]}" for line in self.log(index).splitlines() if " WARNING " in line]
        return "\n".join(lines)

    def close(self) -> None:
        for process in self.peers.values():
            stop_process(process)
        stop_process(self.coordinator)


def max_parameter_difference(states: List[Dict[str, torch.Tensor]]) -> float:
    return max((other[name] - states[0][name]).abs().max().item() for other in states[1:] for name in states[0])


def assert_no_tracebacks(swarm: LocalSwarm, indices) -> None:
    for index in indices:
        log = swarm.log(index)
        assert "Traceback" not in log, f"{index} logged a traceback:\n{log[-3000:]}"


async def count_state_download_messages(stub, timeout: float = 60.0) -> dict:
    """Ask an averager stub for its state (rpc_download_state) and count what comes back:
    {"download_messages": N}, plus "download_error" when the call failed."""
    import asyncio

    from hivemind.proto import averaging_pb2

    out, count = {}, 0
    try:
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())

        async def consume():
            nonlocal count
            async for _ in stream:
                count += 1

        await asyncio.wait_for(consume(), timeout)
    except Exception as error:
        out["download_error"] = repr(error)
    out["download_messages"] = count
    return out
