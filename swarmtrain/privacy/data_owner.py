"""The data owner of a split run (`swarmtrain peer --role data-owner`): it trains its own bottom layers
and the privacy head through a trunk host; only Z (the activations at the cut) and the labels leave
its machine (see swarmtrain.privacy.swarm for the whole picture)."""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from hivemind.p2p import PeerID

from swarmtrain.errors import UserError
from swarmtrain.monitoring.status import PeerStatus

from .digits import NUM_CLASSES, NUM_FEATURES, load_digits_splits
from .split import DataOwnerClient, owner_privacy_head
from .swarm import SplitRole, find_trunks, run_in_loop_thread, split_models

logger = logging.getLogger("swarmtrain.split")

OWNER_BOTTOM_CUT = "3"     # in DigitsNet.features (the bottom): the second ReLU, whose output is Z
SWITCH_AFTER_DROPS = 3     # a data owner looks for another trunk host after this many failed steps in a row
FIND_TRUNK_TIMEOUT = 60.0  # seconds a data owner looks for a trunk host before giving up


class _Stopped(Exception):
    """A stop signal came while looking for a trunk host (KeyboardInterrupt follows in the main thread)."""


def load_owner_data(path: Optional[str], seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(train_x, train_y, test_x, test_y, description): the embedded digits, or an .npz with x and y."""
    if path is None:
        splits = load_digits_splits(seed=seed)
        return (splits.private_x, splits.private_y, splits.test_x, splits.test_y,
                f"sklearn digits (embedded): {len(splits.private_x)} training, {len(splits.test_x)} held-out samples")
    if not str(path).endswith(".npz"):
        raise UserError(f"--data-owner-data {path}: expected an .npz file with arrays x [N, {NUM_FEATURES}] "
                        f"(floats, e.g. pixels in [0, 1]) and y [N] (class ids 0-{NUM_CLASSES - 1})")
    try:
        with np.load(Path(path)) as archive:
            x, y = np.asarray(archive["x"], dtype=np.float32), np.asarray(archive["y"])
    except KeyError as missing:
        raise UserError(f"--data-owner-data {path}: the archive has no array {missing}; it needs x and y") from None
    except (OSError, ValueError) as error:
        raise UserError(f"--data-owner-data {path}: cannot read it ({error})") from None
    x = x.reshape(len(x), -1)
    if x.shape[1] != NUM_FEATURES or y.shape != (len(x),) or len(x) < 10:
        raise UserError(f"--data-owner-data {path}: x must be [N, {NUM_FEATURES}] and y [N] with N >= 10; got "
                        f"x {list(x.shape)}, y {list(y.shape)}")
    if not np.isfinite(x).all() or y.min() < 0 or y.max() >= NUM_CLASSES or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"--data-owner-data {path}: x must be finite and y integer class ids in [0, {NUM_CLASSES})")
    order = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, len(x) // 5)
    xt, yt = torch.from_numpy(x[order]), torch.from_numpy(y[order].astype(np.int64))
    return xt[cut:], yt[cut:], xt[:cut], yt[:cut], f"{path}: {len(x) - cut} training, {cut} held-out samples"


def owner_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
    batch_size = min(batch_size, len(x))
    while True:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


class DataOwnerRole(SplitRole):
    """`swarmtrain peer --role data-owner`: train through a trunk host until --max-steps or a stop; at the
    end (not on a stop) the held-out accuracy and leakage. Constructed like SplitRole."""

    role = "data-owner"

    def __init__(self, swarm, options, status: PeerStatus, machine=None):
        super().__init__(swarm, options, status, machine)
        config = self.config
        self.train_x, self.train_y, self.test_x, self.test_y, description = load_owner_data(options.data_owner_data,
                                                                                            config.seed)
        logger.info(f"data (never leaves this machine): {description}")
        self.bottom = split_models(self.split, config.seed).features
        # Every defence of the run's privacy section (alpha, cut_noise, adversary, warm-up); a disabled
        # section only measures leakage. The adversary's decoder sees the labels: what Z reveals beyond them.
        self.head = owner_privacy_head(self.bottom, config.privacy, OWNER_BOTTOM_CUT, num_classes=NUM_CLASSES)
        defence = self.head.config
        logger.info(f"privacy head at the cut: alpha {defence.alpha:g}, cut_noise {defence.cut_noise:g}, adversary_weight "
                    f"{defence.adversary_weight:g}, warm-up {defence.warmup_steps} steps; leakage reported as dCor "
                    f"({defence.leakage_statistic.upper()} statistic) of X and the released Z")
        self.optimizer = torch.optim.Adam(self.bottom.parameters(), lr=self.split.lr)
        self.start_reporting()
        self.batches = owner_batches(self.train_x, self.train_y, self.split.batch_size,
                                     torch.Generator().manual_seed(config.seed))
        status.update(phase="finding a trunk host", role="data-owner")
        status.write(options.status_file)

    def run(self) -> None:
        try:
            run_in_loop_thread(self._train, threading.Event(), "data-owner")
        except _Stopped:
            pass  # the stop signal came while looking for a trunk host: KeyboardInterrupt follows

    async def _find_trunk(self, stop: threading.Event, exclude: Optional[PeerID] = None) -> PeerID:
        deadline = time.monotonic() + FIND_TRUNK_TIMEOUT
        while True:
            if stop.is_set():
                raise _Stopped()
            trunks = await asyncio.get_running_loop().run_in_executor(None, find_trunks, self.swarm.dht,
                                                                      self.config.run_id)
            choices = [t for t in trunks if t != exclude] or trunks
            if choices:
                return random.choice(choices)
            if time.monotonic() > deadline:
                raise UserError(f"no trunk host of run {self.config.run_id!r} announced itself in "
                                f"{FIND_TRUNK_TIMEOUT:.0f}s: a split run needs at least one peer with --role trunk")
            await asyncio.sleep(1.0)

    async def _train(self, stop: threading.Event) -> None:
        trunk = await self._find_trunk(stop)
        logger.info(f"training through trunk host {trunk}")
        client = DataOwnerClient(await self.swarm.dht.replicate_p2p(), trunk, self.bottom, self.head, self.optimizer,
                                 run_id=self.config.run_id, num_classes=NUM_CLASSES)
        self.status.update(phase="training", trunk=trunk.to_base58())
        drops_in_a_row, started, last_log = 0, time.monotonic(), float("-inf")
        while self.options.max_steps is None or client.stats.steps < self.options.max_steps:
            if stop.is_set():
                return  # run_peer reports the stop; no final evaluation on Ctrl+C
            x, y = next(self.batches)
            result = await client.train_step(x, y)
            if not result.applied:
                drops_in_a_row += 1
                if drops_in_a_row >= SWITCH_AFTER_DROPS:
                    client.trunk_peer_id = await self._find_trunk(stop, exclude=client.trunk_peer_id)
                    logger.warning(f"switching to trunk host {client.trunk_peer_id}")
                    self.status.trunk, drops_in_a_row = client.trunk_peer_id.to_base58(), 0
                else:
                    await asyncio.sleep(0.5)
                continue
            drops_in_a_row = 0
            now = time.monotonic()
            self.status.update(step=client.stats.steps, loss=result.loss, batch_accuracy=result.batch_accuracy,
                               leakage=result.leakage, dropped=client.stats.dropped, bytes_sent=client.stats.bytes_sent,
                               samples_per_second=client.stats.steps * len(y) / max(now - started, 1e-6))
            if now - last_log > 5.0:
                self._report(client, result, len(y))
                last_log = now
        await self._evaluate(client)

    def _report(self, client: DataOwnerClient, result, batch_size: int) -> None:
        logger.info(f"step {client.stats.steps}: loss {result.loss:.3f}, batch accuracy "
                    f"{result.batch_accuracy:.2f}, leakage dCor {result.leakage:.3f}")
        self.status.write(self.options.status_file)
        self.reporter.maybe_publish(step=client.stats.steps, epoch=0, loss=result.loss,
                                    samples_per_second=self.status.samples_per_second,
                                    samples_accumulated=client.stats.steps * batch_size, rounds=[],
                                    leakage=result.leakage)

    async def _evaluate(self, client: DataOwnerClient) -> None:
        accuracy = await client.evaluate(self.test_x, self.test_y)
        with torch.no_grad():  # leakage of the final bottom on held-out data
            self.bottom.eval()
            self.bottom(self.test_x)
            leakage = self.head.measure()
        stats = client.stats
        self.status.update(test_accuracy=accuracy, test_leakage=leakage, step=stats.steps, dropped=stats.dropped,
                           bytes_sent=stats.bytes_sent)
        logger.info(f"data owner done: {stats.steps} steps, held-out accuracy {accuracy:.3f} on {len(self.test_x)} "
                    f"samples, leakage dCor(X, Z) {leakage:.3f}, {stats.dropped} step(s) dropped, "
                    f"{stats.bytes_sent / 1e6:.1f} MB of Z and labels sent")
