"""The coordinator: the swarm's bootstrap node, publisher of the run, and its tracker.

It is not in the data path: peers train on while it is down, and it catches up from the DHT when
it comes back (with the same identity, hence the same multiaddr).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import TrainingProgressSchema
from hivemind.utils import get_dht_time

from swarmtrain.access.authorizer import coordinator_access
from swarmtrain.config import RunConfig
from swarmtrain.data import pin_tokenizer
from swarmtrain.data.transfer import publish_tokenizer
from swarmtrain.errors import UserError
from swarmtrain.monitoring.aggregate import SwarmAggregator
from swarmtrain.monitoring.metrics import SwarmMetrics, serve_metrics
from swarmtrain.monitoring.records import RECORD_TTL, record_validators
from swarmtrain.net.dht import make_dht
from swarmtrain.net.identity import load_or_create_identity
from swarmtrain.net.progress import SwarmProgress, read_swarm_progress
from swarmtrain.net.reachability import serve_reachability_checks
from swarmtrain.net.run_config import RUN_CONFIG_TTL, publish_run_config
from swarmtrain.signals import StopRequested, children_ignore_interrupts, raise_if_stop_requested
from swarmtrain.units import format_duration

logger = logging.getLogger("swarmtrain.coordinator")
REVOCATIONS_PERIOD = 30.0  # seconds between re-reads and re-publications of the revocations file
DHT_CALL_TIMEOUT = 10.0  # seconds a call into the DHT process may take on the way out


async def _connected_peers(_dht, node) -> List[str]:
    # runs inside the DHT process (hence module level: it is pickled there)
    return [f"{addr}/p2p/{info.peer_id}" for info in await node.p2p.list_peers() for addr in info.addrs]


async def _connected_peer_ids(_dht, node) -> List[str]:
    # runs inside the DHT process, like _connected_peers
    return [str(info.peer_id) for info in await node.p2p.list_peers()]


def _read_known_peers(path: Path) -> List[str]:
    try:
        return [str(m) for m in json.loads(path.read_text())]
    except (FileNotFoundError, ValueError, TypeError):
        return []


def pin_and_check_tokenizer(config: RunConfig) -> Tuple[RunConfig, object]:
    """(the config with its tokenizer pinned, the tokenizer): data.tokenizer loaded, checked against
    data.tokenizer_sha256 if the config already pins one, and against the model (vocab size, positions,
    a mask token for a masked LM); UserError in one line otherwise."""
    pinned, tokenizer = pin_tokenizer(config)
    if config.model is not None and (tokenizer.sha256 is not None or config.model.kind == "auto"):
        from swarmtrain.models import check_model  # torch and transformers: only for such runs

        check_model(config.model, config.data.seq_len, tokenizer.vocabulary)
    return pinned, tokenizer


def join_command(maddrs: Sequence[str]) -> str:
    return "swarmtrain peer --initial-peers " + " ".join(maddrs)


class Coordinator:
    """The swarm's bootstrap node, publisher of the run config, tracker and (optionally) checkpointer.

    :param config: the run config it publishes (with its tokenizer pinned here: data.tokenizer_sha256 and
      data.vocab_size filled in from the tokenizer file, which it publishes in the DHT beside the config)
    :param identity: its private key file (the same file, the same address after a restart)
    :param host_maddrs: addresses to listen on
    :param announce_maddrs: public addresses to tell peers, when they differ
    :param metrics_host: interface of the /metrics and /status server
    :param metrics_port: its port (None: no server)
    :param per_peer_metrics: also export one series per peer
    :param checkpoint_dir: download the state from peers and save it here periodically (None: never)
    :param checkpoint_every: seconds between checkpoints
    :param keep_checkpoints: how many of the newest to keep
    :param resume_from: a checkpoint (directory) to start the swarm from
    :param revoked_file: the organiser's revocations (access/bans.py: read_revocations), re-read and
      published while the coordinator runs; on a token-gated run every averager refuses those peers
    """

    def __init__(self, config: RunConfig, *, identity: str, host_maddrs: Sequence[str],
                 announce_maddrs: Sequence[str] = (), metrics_host: str = "0.0.0.0",
                 metrics_port: Optional[int] = None, per_peer_metrics: bool = False, checkpoint_dir: Optional[str] = None,
                 checkpoint_every: float = 600.0, keep_checkpoints: int = 3, resume_from: Optional[str] = None,
                 revoked_file: Optional[str] = None):
        # before anything goes on the network: a tokenizer the model cannot use is refused in one line
        config, self.tokenizer = pin_and_check_tokenizer(config)
        self.revoked_file = revoked_file
        self.config = config
        self.checkpoint_dir, self.checkpoint_every, self.keep_checkpoints = checkpoint_dir, checkpoint_every, keep_checkpoints
        self.private_key = load_or_create_identity(identity)
        self.signature_validator = RSASignatureValidator(self.private_key)
        # on a token-gated run the coordinator is the authority: its DHT and its averager accept the
        # tokens its key signed
        self.access = coordinator_access(self.private_key) if config.access.mode == "token" else None
        # after a restart, rejoin through the peers seen last time: nobody else would tell a fresh
        # bootstrap node about the swarm that kept training without it
        self.known_peers_path = Path(f"{identity}.peers.json")
        self._remembered = set()
        self._observed: Dict[str, float] = {}  # peer ID -> when last seen connected (time.monotonic())
        self.dht = None
        known = _read_known_peers(self.known_peers_path)
        for initial_peers in ([known, []] if known else [[]]):
            try:
                with children_ignore_interrupts():
                    self.dht = make_dht(
                        initial_peers=initial_peers,
                        host_maddrs=host_maddrs,
                        announce_maddrs=announce_maddrs,
                        identity_path=identity,
                        client_mode=False,
                        signature_validator=self.signature_validator,
                        access=self.access,
                    )
                break
            except UserError:
                if not initial_peers:
                    raise
                logger.info("none of the peers seen before the restart answers; starting a new swarm")
        serve_reachability_checks(self.dht)  # newcomers ask the bootstrap node to dial them back
        if known and self.dht is not None:
            logger.info(f"rejoined the swarm through {len(known)} address(es) of peers seen before the restart")
        # the same validators as the peers' trackers and reporters, or reading their records fails
        self.dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=config.run_id),
                                 *record_validators(config.run_id, self.signature_validator)])
        self._published_at = 0.0
        self.aggregator = SwarmAggregator(config.run_id, target_batch_size=config.target_batch_size,
                                          max_age=RECORD_TTL)
        self.metrics = SwarmMetrics(per_peer=per_peer_metrics)
        self.metrics_server = serve_metrics(self.metrics, metrics_host, metrics_port) if metrics_port else None
        self.state = None
        if checkpoint_dir is not None or resume_from is not None:
            from swarmtrain.coordinator.state import StateKeeper  # torch and the model: only when needed

            self.state = StateKeeper(config, self.dht, resume_from, access=self.access)
        self.initial_epoch = self.state.resumed_epoch if self.state is not None else 0

    @property
    def maddrs(self) -> List[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def publish(self) -> None:
        if not publish_run_config(self.dht, self.config, self.signature_validator, self.initial_epoch):
            logger.warning("could not store the run config in the DHT; will retry")
            return
        tokenizer = self.tokenizer
        if tokenizer.sha256 is not None and not publish_tokenizer(
                self.dht, self.config.run_id, tokenizer.content, get_dht_time() + RUN_CONFIG_TTL,
                subkey=self.signature_validator.local_public_key):
            logger.warning("could not store the run's tokenizer in the DHT; will retry")
            return
        self._published_at = time.monotonic()

    def progress(self) -> SwarmProgress:
        return read_swarm_progress(self.dht, self.config.run_id, self.config.target_batch_size)

    def run(self, log_every: float = 10.0, stop_after: Optional[float] = None) -> None:
        """Publish the run and log progress until Ctrl+C/SIGTERM (or stop_after seconds)."""
        started = time.monotonic()
        last_log = last_poll = last_remember = last_revoked = 0.0
        last_checkpoint = time.monotonic()
        while stop_after is None or time.monotonic() - started < stop_after:
            raise_if_stop_requested()
            if time.monotonic() - self._published_at > RUN_CONFIG_TTL / 4:
                self.publish()
            if time.monotonic() - last_poll >= 2.0:
                self.metrics.update(self.aggregator.poll(self.dht, observed=self.observed_peers()))
                last_poll = time.monotonic()
            if time.monotonic() - last_remember >= 2.0:  # a local call; the file is written on changes only
                self.remember_peers()
                last_remember = time.monotonic()
            if self.revoked_file and time.monotonic() - last_revoked >= REVOCATIONS_PERIOD:
                self.publish_revocations()
                last_revoked = time.monotonic()
            if self.checkpoint_dir and time.monotonic() - last_checkpoint >= self.checkpoint_every:
                self.save_checkpoint()
                last_checkpoint = time.monotonic()
            if time.monotonic() - last_log >= log_every:
                logger.info(progress_line(self.progress(), self.config.target_batch_size))
                last_log = time.monotonic()
            time.sleep(0.5)

    def publish_revocations(self) -> None:
        """Publish the revocations file's current entries (a malformed file is logged, not fatal: the
        organiser fixes it while the run goes on)."""
        from swarmtrain.access.bans import publish_revocations, read_revocations

        try:
            revocations = read_revocations(self.revoked_file)
            publish_revocations(self.dht, self.config.run_id, self.signature_validator.local_public_key, revocations)
        except Exception as error:
            logger.warning(f"could not publish the revocations: {error}")

    def observed_peers(self) -> Set[str]:
        """Peer IDs connected to this node now or within the last RECORD_TTL seconds. libp2p
        authenticates them, so unlike a record's claims they cost something to multiply: only their
        records count in the swarm's figures (a node publishing a thousand records under fresh keys is
        still one peer)."""
        try:
            connected = self.dht.run_coroutine(_connected_peer_ids)
        except Exception as error:
            logger.debug(f"could not list peers: {error!r}")
            connected = []
        now = time.monotonic()
        for peer_id in [*connected, str(self.dht.peer_id)]:
            self._observed[peer_id] = now
        for peer_id in [peer_id for peer_id, seen in self._observed.items() if now - seen > RECORD_TTL]:
            del self._observed[peer_id]
        return set(self._observed)

    def remember_peers(self) -> None:
        try:
            maddrs = self._ask_dht(_connected_peers)
        except Exception as error:
            logger.debug(f"could not list peers: {error!r}")
            return
        kept = maddrs[:64]
        if kept and set(kept) != self._remembered:
            self._remembered = set(kept)
            tmp = self.known_peers_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(kept))
            os.replace(tmp, self.known_peers_path)

    def _ask_dht(self, coroutine):
        """Run `coroutine` in the DHT process; TimeoutError when that process is gone or does not
        answer within DHT_CALL_TIMEOUT. A stop signal sent to our whole process group (``timeout``,
        ``kill -TERM -PGID``, systemd) ends the DHT process too, and nothing would ever answer."""
        future = self.dht.run_coroutine(coroutine, return_future=True)
        deadline = time.monotonic() + DHT_CALL_TIMEOUT
        while True:
            try:
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                if not self.dht.is_alive() or time.monotonic() > deadline:
                    future.cancel()
                    raise TimeoutError("the DHT process did not answer") from None

    def save_checkpoint(self):
        try:
            path = self.state.checkpoint(self.checkpoint_dir, self.keep_checkpoints)
        except Exception as error:  # no donor right now, a timeout: try again next period
            logger.warning(f"checkpoint failed ({type(error).__name__}: {error}); trying again in "
                           f"{format_duration(self.checkpoint_every)}")
            return None
        if path is not None:
            logger.info(f"checkpoint of epoch {self.state.last_saved_epoch} saved to {path}")
        return path

    def shutdown(self) -> None:
        """Leave promptly whatever state the children are in: a stop signal sent to the whole
        process group (``timeout``, ``kill -TERM -PGID``, systemd's control-group stop) has already
        ended the DHT process, and a call into a dead DHT would wait for ever. A second stop
        signal skips what is left."""
        try:
            self.remember_peers()  # so that a restart finds the swarm again even if it changed meanwhile
            if self.metrics_server is not None:
                self.metrics_server.stop()
            if self.state is not None:
                self.state.shutdown()
        except StopRequested:
            logger.info("stopping without the rest of the clean-up")
        finally:
            self.dht.shutdown()  # returns at once when the DHT process is gone (and reaps it)


def progress_line(progress: SwarmProgress, target_batch_size: int) -> str:
    """The coordinator's periodic log line."""
    peers = f"{progress.peers} peer{'' if progress.peers == 1 else 's'}"
    return (f"epoch {progress.epoch}: {peers} ({progress.clients} client{'' if progress.clients == 1 else 's'}), "
            f"{progress.samples_accumulated}/{target_batch_size} samples, "
            f"{progress.samples_per_second:.1f} samples/s, next epoch in {format_duration(progress.eta_seconds)}")
