"""The streamed training data: peers' shards, restarts, the held-out set, memory, stopping.

Peers are separate processes (each with its own peer ID) that share nothing but the files on disk
and the position token they are handed, as on a real swarm.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest

from swarmtrain.config import DataConfig
from swarmtrain.data import open_training_data

READER = textwrap.dedent("""
    import hashlib, json, sys
    from swarmtrain.config import DataConfig
    from swarmtrain.data import open_training_data
    args = json.loads(sys.argv[1])
    peers = [p.encode() for p in args["peers"]] if args.get("peers") else None
    data = open_training_data(DataConfig(**args["config"]), None, args["peer"].encode(), args.get("position"),
                              max_passes=args.get("passes"), peers=peers)
    digest = lambda block: hashlib.sha1(block.numpy().tobytes()).hexdigest()
    blocks = []
    for batch in data.batches(args["batch"]):
        blocks += [digest(block) for block in batch]
        if args.get("stop_after") and len(blocks) >= args["stop_after"]:
            break
    print(json.dumps({"blocks": blocks, "position": data.position(),
                      "heldout": [digest(block) for block in data.heldout]}))
    data.close()
""")


def read_as_peer(peer, config, **args):
    """Run a peer's data reader in its own process; its delivered blocks (as hashes), position, held-out."""
    result = subprocess.run([sys.executable, "-c", READER, json.dumps({"peer": peer, "config": config, **args})],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def corpus_config(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    for i in range(30):  # every line differs, so every block is unique and can be told apart
        (directory / f"doc{i:02d}.txt").write_text("".join(f"{i}-{j} " * (3 + j % 4) + "\n" for j in range(150)))
    return {"source": "text", "path": str(directory), "seq_len": 32, "heldout_blocks": 16, "num_shards": 24}


@pytest.fixture(scope="module")
def alone(corpus_config):
    return read_as_peer("alone", corpus_config, passes=1, batch=1)


def test_two_peers_shards_are_disjoint_and_cover_the_corpus(corpus_config, alone):
    both = ["peer-a", "peer-b"]
    first = read_as_peer("peer-a", corpus_config, passes=1, batch=1, peers=both)
    second = read_as_peer("peer-b", corpus_config, passes=1, batch=1, peers=both)
    everything = Counter(alone["blocks"])
    assert len(everything) == len(alone["blocks"]) > 1000  # unique blocks
    assert set(first["blocks"]).isdisjoint(second["blocks"])
    assert Counter(first["blocks"]) + Counter(second["blocks"]) == everything
    assert min(len(first["blocks"]), len(second["blocks"])) > 0.25 * len(everything)  # both have a real share


def test_heldout_is_the_same_on_every_peer_and_never_trained_on(corpus_config, alone):
    other = read_as_peer("someone-else", corpus_config, batch=4, stop_after=40)
    assert len(alone["heldout"]) == 16 and other["heldout"] == alone["heldout"]
    assert set(alone["heldout"]).isdisjoint(alone["blocks"])


def test_a_restarted_peer_continues_instead_of_replaying(corpus_config, alone):
    before = read_as_peer("alone", corpus_config, passes=1, batch=7, stop_after=500)
    after = read_as_peer("alone", corpus_config, passes=1, batch=1, position=before["position"])
    assert len(before["blocks"]) == 504
    assert set(before["blocks"]).isdisjoint(after["blocks"])  # nothing replayed...
    assert Counter(before["blocks"]) + Counter(after["blocks"]) == Counter(alone["blocks"])  # ...nothing skipped
    fresh = read_as_peer("alone", corpus_config, passes=1, batch=7, stop_after=500)
    assert fresh["blocks"] == before["blocks"]  # without the position it would have replayed


def test_a_position_of_another_corpus_is_ignored(corpus_config, tmp_path, caplog):
    with open_training_data(DataConfig(**corpus_config), None, b"p") as data:
        next(data.batches(4))
        position = data.position()
    other = dict(corpus_config, num_shards=7)  # another shard plan
    with open_training_data(DataConfig(**other), None, b"p", start_position=position) as data:
        assert next(data.batches(4)).shape == (4, 32)
    assert "another corpus or shard plan" in caplog.text


def test_endless_passes_and_changing_batch_size(corpus_config, alone):
    batches = 3 * len(alone["blocks"]) // 64  # three passes' worth
    with open_training_data(DataConfig(**corpus_config), None, b"p") as data:
        stream = data.batches(64)
        count = sum(len(next(stream)) for _ in range(batches))
        assert data.position()["pass"] == 2
        assert next(data.batches(5)).shape == (5, 32)
        assert count == batches * 64


def test_close_stops_the_reader_thread(corpus_config):
    data = open_training_data(DataConfig(**corpus_config), None, b"p")
    next(data.batches(2))
    data.close()
    assert not [t for t in threading.enumerate() if t.name == "swarmtrain-data" and t.is_alive()]


def test_ctrl_c_ends_a_reading_process_promptly(corpus_config):
    """Ctrl+C reaches the main thread at once while the reader thread works, and the process ends (a
    reader thread that kept the interpreter alive would hang it). The interpreter's own teardown is
    timed apart: at nice 15 on a loaded machine it alone took 2-16 s."""
    loop = ("print('reading', flush=True)\ntry:\n    for batch in data.batches(args['batch']):\n        pass\n"
            "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n    raise\n")
    script = READER[: READER.index("for batch in data.batches")] + loop
    # a shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler in the child: `make test &` failed here. The child gets the terminal's default instead
    process = subprocess.Popen([sys.executable, "-c", script, json.dumps({"peer": "p", "config": corpus_config,
                                                                           "batch": 1})],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout.readline().strip() == "reading"
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    answer = []
    reader = threading.Thread(target=lambda: answer.append(process.stdout.readline().strip()), daemon=True)
    reader.start()
    reader.join(timeout=10)
    try:
        assert answer == ["interrupted"], "KeyboardInterrupt did not reach the main thread within 10 s of SIGINT"
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0 and "KeyboardInterrupt" in process.stderr.read()


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    from swarmtrain.config import DataConfig
    from swarmtrain.data import open_training_data
    data = open_training_data(DataConfig(source="text", path=sys.argv[1], seq_len=128), None, b"peer")
    stream = data.batches(32)
    for _ in range(1500):  # 48000 blocks: more than a shard's worth from each open shard
        next(stream)
    print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "shards": data.source.num_units}))
    data.close()
""")


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """A 64 GB corpus (a sparse file: it takes no disk) is opened and read with the memory of a 1 MB one."""
    small = tmp_path / "small.txt"
    small.write_bytes(b"some text\n" * 100_000)
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as handle:
        handle.truncate(64 * 2**30)
    if os.stat(huge).st_blocks * 512 > 2**30:
        pytest.skip("this filesystem has no sparse files")
    peaks = {}
    for name, path in (("small", small), ("huge", huge)):
        result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[name] = json.loads(result.stdout)
    assert peaks["huge"]["shards"] == 65536 and peaks["small"]["shards"] == 64
    assert peaks["huge"]["peak_kb"] - peaks["small"]["peak_kb"] < 50 * 1024, peaks


def test_a_peer_joining_takes_shards_only_from_the_others_not_among_them():
    """Rendezvous hashing: a new peer's share comes from every peer, and no shard moves between the others."""
    import numpy as np

    from swarmtrain.data.stream import peer_hash, shard_owners

    hashes = np.arange(5000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    peers = np.array([peer_hash(name.encode()) for name in ("a", "b", "c")], dtype=np.uint64)
    before = peers[shard_owners(hashes, peers)]
    joined = np.append(peers, np.uint64(peer_hash(b"d")))
    after = joined[shard_owners(hashes, joined)]
    moved = before != after
    assert (after[moved] == joined[-1]).all()  # every moved shard went to the newcomer
    assert 0.18 < moved.mean() < 0.32  # about a quarter
    shares = [(after == peer).mean() for peer in joined]
    assert min(shares) > 0.2 and max(shares) < 0.3


def test_a_shard_the_heldout_used_up_does_not_end_the_pass(tmp_path):
    """Shards whose only text went to the held-out set are empty for training: opening one must not be taken
    for the end of the pass (it ended a peer's first pass with 'no training block' when such a shard came
    first in its order, and skipped the rest of a pass when one came after the open shards ran out)."""
    for i in range(16):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"{i} " * 400 + "\n")
    config = DataConfig(source="text", path=str(tmp_path), seq_len=32, heldout_blocks=64, num_shards=16)
    with open_training_data(config, None, b"alone", max_passes=1) as data:
        everything = sum(len(batch) for batch in data.batches(1))
    assert everything > 0
    for peer in range(24):  # each peer reads the shards in its own order: some start with a used-up one
        with open_training_data(config, None, f"peer-{peer}".encode(), max_passes=1) as data:
            assert sum(len(batch) for batch in data.batches(1)) == everything, peer
