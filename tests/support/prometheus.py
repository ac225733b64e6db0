"""A real Prometheus for tests: scrapes given targets every second, answers PromQL over its HTTP API.

Use the ``prometheus`` fixture (a factory; conftest.py registers it for every test module)::

    def test_x(prometheus):
        server = prometheus(["127.0.0.1:9400"])
        server.wait_for_data("swarmtrain_epoch")

or, outside pytest, ``with PrometheusServer(["127.0.0.1:9400"]) as server: ...``.
The binary is ``$PROMETHEUS_BINARY`` or ``prometheus`` on PATH (``deploy/install-prometheus.sh``
installs Debian's); tests skip when it is missing. Every server started is stopped at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import pytest

from swarmtrain.demo import free_port


def prometheus_binary() -> Optional[str]:
    return os.environ.get("PROMETHEUS_BINARY") or shutil.which("prometheus")


def scrape_config(targets: Sequence[str], scrape_interval: str = "1s", job: str = "swarmtrain") -> dict:
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {"job_name": job, "scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
             "static_configs": [{"targets": list(targets)}]}
        ],
    }


class PrometheusServer:
    """A Prometheus process on 127.0.0.1 with a temporary config and storage, stopped by ``stop()``."""

    def __init__(self, targets: Sequence[str], scrape_interval: str = "1s", binary: Optional[str] = None,
                 startup_timeout: float = 30.0, config: Optional[dict] = None):
        """``config``: a whole Prometheus config (e.g. deploy/prometheus.yml with its targets replaced)
        instead of one job scraping ``targets``."""
        self.binary = binary or prometheus_binary()
        if self.binary is None:
            raise FileNotFoundError("prometheus binary not found (run deploy/install-prometheus.sh)")
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.config = config
        self.startup_timeout = startup_timeout
        self.port: Optional[int] = None
        self._workdir: Optional[tempfile.TemporaryDirectory] = None
        self._process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "PrometheusServer":
        self._workdir = tempfile.TemporaryDirectory(prefix="swarmtrain-prometheus-")
        workdir = Path(self._workdir.name)
        config_path = workdir / "prometheus.yml"
        # JSON is valid YAML: no YAML library needed
        config = self.config if self.config is not None else scrape_config(self.targets, self.scrape_interval)
        config_path.write_text(json.dumps(config, indent=2))
        self.port = free_port()
        self._log = open(workdir / "prometheus.log", "wb")
        self._process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {self.startup_timeout}s:\n{self.log()}")

    def log(self) -> str:
        if self._workdir is None:
            return ""
        path = Path(self._workdir.name) / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout=10)
            self._process = None
            self._log.close()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def query(self, expr: str) -> List[dict]:
        """Evaluate an instant PromQL query now; returns the API's ``data.result`` list."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # 400 for a bad query: surface Prometheus' message
            body = json.load(error)
        if body.get("status") != "success":
            raise ValueError(f"query {expr!r} failed: {body.get('errorType')}: {body.get('error')}")
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return result

    def wait_for_data(self, expr: str, timeout: float = 30.0,
                      predicate: Callable[[List[dict]], bool] = bool) -> List[dict]:
        """Poll ``expr`` until ``predicate(result)`` holds (default: a non-empty result)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.25)

    def targets_health(self) -> List[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            return json.load(response)["data"]["activeTargets"]


@pytest.fixture
def prometheus():
    """Factory: ``prometheus(targets, scrape_interval="1s", config=None) -> PrometheusServer`` (started, ready)."""
    if prometheus_binary() is None:
        pytest.skip("prometheus binary not found: run deploy/install-prometheus.sh")
    started = []

    def start(targets: Sequence[str], scrape_interval: str = "1s", config: Optional[dict] = None) -> PrometheusServer:
        server = PrometheusServer(targets, scrape_interval, config=config)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()
