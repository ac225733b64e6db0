"""`swarmtrain doctor` against a real coordinator on loopback, and its pieces in process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swarmtrain.cli import doctor as doctor_module
from swarmtrain.peer import resources
from swarmtrain.config import load_run_config
from swarmtrain.demo import free_port, start_coordinator, stop_process

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
ALBERT = REPO / "configs" / "pretrain-albert.yaml"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("doctor-swarm")
    process, maddr = start_coordinator(workdir, TINY)
    try:
        yield maddr
    finally:
        stop_process(process)


def run_doctor(tmp_path: Path, *args: str, timeout: float = 150) -> tuple[int, str, str]:
    """`python -m swarmtrain.doctor ARGS` as a user runs it; its whole process group is swept after."""
    out, err = tmp_path / "doctor.out", tmp_path / "doctor.err"
    env = dict(os.environ, HIVEMIND_LOGLEVEL="ERROR")
    process = subprocess.Popen([sys.executable, "-m", "swarmtrain", "doctor", *args], stdout=open(out, "w"),
                               stderr=open(err, "w"), start_new_session=True, env=env)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code is not None, f"doctor hung:\n{out.read_text()[-2000:]}\n{err.read_text()[-3000:]}"
    return code, out.read_text(), err.read_text()


def rows_by_check(stdout: str) -> dict:
    return {row["check"]: row for row in json.loads(stdout)}


def assert_no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text[-3000:]


def test_good_setup_is_all_ok(coordinator, tmp_path):
    code, out, err = run_doctor(tmp_path, "--initial-peers", coordinator, "--device", "cpu", "--json")
    assert_no_traceback(out, err)
    rows = rows_by_check(out)
    assert code == 0, rows
    assert [r for r in rows.values() if r["status"] not in ("ok", "warn")] == []
    initial = [r for name, r in rows.items() if name.startswith("initial peer")]
    assert len(initial) == 1 and initial[0]["status"] == "ok"
    assert "tiny-code-lm" in rows["run config"]["detail"]  # fetched from the swarm, not a local file
    assert rows["this peer reachable"]["status"] in ("ok", "warn")
    assert "dialled at" in rows["this peer reachable"]["detail"]
    assert rows["clock"]["status"] == "ok" and "offset" in rows["clock"]["detail"]
    assert rows["memory"]["status"] == "ok" and "parameters" in rows["memory"]["detail"]
    assert rows["access token"]["detail"].startswith("not required")
    # issue #16: the JSON names things in full (the table shortens them), and stderr says what is being checked
    assert f"initial peer {coordinator}" in rows and "…" not in out, out
    progress = [line for line in err.splitlines() if line.startswith("doctor: ")]
    assert any("dial this machine back" in line for line in progress), err
    assert any("memory one training step" in line for line in progress), err


def test_table_output(coordinator, tmp_path):
    code, out, err = run_doctor(tmp_path, "--initial-peers", coordinator, "--device", "cpu", "--config", str(TINY))
    assert_no_traceback(out, err)
    assert code == 0, out
    assert "swarmtrain doctor" in out and "all ok" in out and "clock" in out


def test_unreachable_initial_peer(coordinator, tmp_path):
    nobody = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{coordinator.rsplit('/p2p/', 1)[1]}"
    code, out, err = run_doctor(tmp_path, "--initial-peers", nobody, "--device", "cpu", "--json")
    assert_no_traceback(out, err)
    rows = rows_by_check(out)
    assert code == 1
    initial = [r for name, r in rows.items() if name.startswith("initial peer")]
    assert len(initial) == 1 and initial[0]["status"] == "fix", rows
    assert "could not reach any initial peer" in initial[0]["detail"]
    # what needs the swarm is skipped, not failed again; the machine's own checks still ran
    assert rows["this peer reachable"]["status"] == "skip" and rows["clock"]["status"] == "skip"
    assert rows["python"]["status"] == rows["torch"]["status"] == "ok"
    assert [name for name, r in rows.items() if r["status"] == "fix"] == [next(n for n in rows if n.startswith("initial peer"))]


def test_announce_address_nobody_can_dial(coordinator, tmp_path):
    closed = free_port()  # nothing listens there: the announced address leads nowhere
    code, out, err = run_doctor(tmp_path, "--initial-peers", coordinator, "--device", "cpu", "--json",
                                "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{closed}")
    assert_no_traceback(out, err)
    rows = rows_by_check(out)
    assert code == 1
    reach = rows["this peer reachable"]
    assert reach["status"] == "fix", reach
    assert f"/ip4/127.0.0.1/tcp/{closed}" in reach["detail"] and "could not dial" in reach["detail"]
    assert "--client-mode" in reach["fix"] and "--port" in reach["fix"]
    assert [name for name, r in rows.items() if r["status"] == "fix"] == ["this peer reachable"]


def test_port_in_use_is_our_problem_not_the_coordinators(coordinator, tmp_path):
    import socket

    with socket.socket() as other_program:  # holds the port without SO_REUSEPORT, as most programs do
        other_program.bind(("0.0.0.0", 0))
        other_program.listen()
        taken = other_program.getsockname()[1]
        code, out, err = run_doctor(tmp_path, "--initial-peers", coordinator, "--device", "cpu", "--json",
                                    "--port", str(taken), "--timeout", "5")
    assert_no_traceback(out, err)
    rows = rows_by_check(out)
    assert code == 1
    assert rows["network"]["status"] == "fix" and "in use" in rows["network"]["detail"], rows
    assert not any(name.startswith("initial peer") and r["status"] == "fix" for name, r in rows.items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(coordinator, tmp_path):
    code, out, err = run_doctor(tmp_path, "--initial-peers", coordinator, "--device", "cuda", "--json")
    assert_no_traceback(out, err)
    rows = rows_by_check(out)
    assert code == 1
    assert rows["device"]["status"] == "fix"
    assert "CUDA is not available" in rows["device"]["detail"] and "--device cpu" in rows["device"]["fix"]
    assert [name for name, r in rows.items() if r["status"] == "fix"] == ["device"]


@pytest.mark.parametrize("args, message", [
    (["--public-ip", "203.0.113.5"], "--public-ip needs --port"),
    (["--port", "31337", "--public-ip", "my.home.example"], "is not an IP address"),
    (["--initial-peers", "127.0.0.1:31337"], "is not a multiaddr"),
])
def test_flag_mistakes_are_one_line(tmp_path, args, message):
    code, out, err = run_doctor(tmp_path, *args, timeout=60)
    assert code == 1
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------------
# in process: the memory estimate and the clock verdict
# ------------------------------------------------------------------------------------------


def test_memory_estimate_counts_optimizer_state():
    num_params = 10_000_000
    _, fp32 = resources.memory_needed(num_params, eight_bit=False, device="cpu")
    _, eight_bit = resources.memory_needed(num_params, eight_bit=True, device="cpu")
    assert fp32 == num_params * (12 + 8 + 8) and eight_bit == num_params * (12 + 8 + 2)
    gpu, host = resources.memory_needed(num_params, eight_bit=False, device="cuda:0")
    assert gpu == num_params * 12 and host == num_params * 16


def test_memory_row_fails_when_the_run_does_not_fit(monkeypatch):
    config = load_run_config(ALBERT)
    from swarmtrain.models import build_model

    real = build_model(config.model, config.data.seq_len, config.seed)  # the meta-device count must match it
    assert resources.count_parameters(config) == sum(p.numel() for p in real.parameters())
    monkeypatch.setattr(doctor_module, "free_host_memory", lambda: 100 * 2**20)
    row = doctor_module.check_memory(config, "cpu")
    assert row.status == "fix" and "not enough RAM" in row.detail
    assert "optimizer.eight_bit" in row.fix
    monkeypatch.setattr(doctor_module, "free_host_memory", lambda: 64 * 2**30)
    assert doctor_module.check_memory(config, "cpu").status == "ok"


def test_clock_verdict():
    assert doctor_module._clock_row([dict(ok=True, rtt=0.002, offset=0.05)]).status == "ok"
    late = doctor_module._clock_row([dict(ok=True, rtt=0.002, offset=-4.0)])
    assert late.status == "fix" and "-4.000" in late.detail and "set-ntp" in late.fix
    # the best (shortest round trip) measurement decides
    assert doctor_module._clock_row([dict(ok=True, rtt=3.0, offset=2.5),
                                     dict(ok=True, rtt=0.01, offset=0.1)]).status == "ok"
    assert doctor_module._clock_row([dict(ok=False, error="x")]).status == "skip"


# ------------------------------------------------------------------------------------------
# a swarm where a peer answers dial-back requests (as every peer will once wired in)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker(coordinator, tmp_path_factory):
    """A DHT peer in the coordinator's swarm that serves reachability checks, as its own process."""
    import time

    log = tmp_path_factory.mktemp("checker") / "checker.log"
    helper = REPO / "tests" / "test_reachability.py"
    process = subprocess.Popen([sys.executable, str(helper), "serve", f"/ip4/127.0.0.1/tcp/{free_port()}", coordinator],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                               env=dict(os.environ, HIVEMIND_LOGLEVEL="ERROR"))
    try:
        deadline = time.monotonic() + 60
        while "MADDR " not in log.read_text() or not log.read_text().endswith("\n"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield log.read_text().split("MADDR ", 1)[1].split()[0]
    finally:
        stop_process(process)


def test_reachable_as_seen_by_another_peer(coordinator, checker, tmp_path):
    code, out, err = run_doctor(tmp_path, "--initial-peers", f"{coordinator} {checker}", "--device", "cpu", "--json")
    assert_no_traceback(out, err)
    rows = rows_by_check(out)
    assert code == 0, rows
    reach = rows["this peer reachable"]
    # another peer (the coordinator or the checker, both serve checks) dialled us: a real "ok"
    servers = {maddr.rsplit('/p2p/', 1)[1] for maddr in (coordinator, checker)}
    assert reach["status"] == "ok" and any(f"by peer {peer}" in reach["detail"] for peer in servers), reach


def test_unreachable_as_seen_by_another_peer(coordinator, checker, tmp_path):
    closed = free_port()
    code, out, err = run_doctor(tmp_path, "--initial-peers", f"{coordinator} {checker}", "--device", "cpu", "--json",
                                "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{closed}")
    assert_no_traceback(out, err)
    rows = rows_by_check(out)
    assert code == 1
    reach = rows["this peer reachable"]
    servers = {maddr.rsplit('/p2p/', 1)[1] for maddr in (coordinator, checker)}
    assert reach["status"] == "fix" and any(reach["detail"].startswith(f"peer {peer}") for peer in servers), reach
    assert "connection refused" in reach["detail"], reach
