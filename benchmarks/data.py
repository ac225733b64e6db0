"""A peer's memory and data speed on generated corpora of 0.1, 1 and 5 GB on disk.

    nice -n 15 python benchmarks/data.py                          # -> benchmarks/results/data.json, data.png
    python benchmarks/data.py --sizes 0.1,1 --arrow-sizes 0.1     # a quicker run

Disk: the largest corpus plus ~1 GB (corpora are generated one at a time under --workdir, default
/tmp/swarmtrain-databench, and deleted after their measurement; the Arrow corpora need twice their
size while they are written). Time: ~15 minutes on 2 busy cores, most of it writing the 5 GB.

What it does:
1. Generates text: a pool of distinct lines of pseudo-words drawn from a Zipf law (real text's word
   statistics, not its meaning), written as 256 MB files of shuffled pool lines in paragraphs.
2. Trains the run's tokenizer once, as the README tells organisers to (`swarmtrain tokenizer train`,
   byte-level BPE, 32000 tokens, on 100 MB of the first corpus).
3. For each corpus, in a fresh process per corpus (so that peak RSS is that corpus's alone): opens
   the data exactly as a peer does (configs/pretrain-llama.yaml's data section: 512-token blocks,
   4 MiB shards), reads --loader-blocks blocks from the loader alone (its speed, and the peak RSS
   of the data part), then builds that config's model (llama, ~42M parameters with this vocabulary)
   with AdamW and trains --steps steps on batches from the stream, the loader thread running
   alongside as in a peer, timing how long each step waited for its batch. Peak RSS is the
   process's VmHWM at the end.
4. The same on the demo's data and model (stdlib .py files, byte tokenizer, 2-layer GPT-2), the
   fastest consumer there is.
Torch and the tokenizer use one thread each (TOKENIZERS_PARALLELISM=false): both rates are per
core, the ratio a peer with one core for each would see.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
FILE_BYTES = 256 * 10**6
POOL_LINES = 300_000


def line_pool(seed: int = 0) -> list:
    """Distinct lines of 4-40 pseudo-words, word frequencies following a Zipf law (exponent 1.1)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 11))) for _ in range(40_000)]
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    lengths = rng.integers(4, 41, size=POOL_LINES)
    picks = rng.choice(len(words), size=int(lengths.sum()), p=weights / weights.sum())
    lines, start = [], 0
    for number, length in enumerate(lengths.tolist()):
        body = " ".join(words[i] for i in picks[start : start + length])
        lines.append(f"{body.capitalize()} {number}.\n")
        start += length
    return lines


def write_text_corpus(directory: Path, total_bytes: int, pool: list, seed: int) -> None:
    directory.mkdir(parents=True)
    rng, written, index = np.random.default_rng(seed), 0, 0
    while total_bytes - written > 1000:  # (files end at a line end: the last one a little short of the total)
        with open(directory / f"part-{index:04d}.txt", "w") as handle:
            size, wanted = 0, min(FILE_BYTES, total_bytes - written)
            while size < wanted:
                order = rng.permutation(len(pool))
                paragraphs = "".join(pool[i] + ("\n" if i % 7 == 0 else "") for i in order)
                last = size + len(paragraphs) >= wanted
                if last:  # end the file at the last line end before its size
                    paragraphs = paragraphs[: paragraphs.rfind("\n", 0, wanted - size) + 1]
                handle.write(paragraphs)
                size += len(paragraphs)
                if last:
                    break
        written += size
        index += 1


def write_arrow_corpus(directory: Path, total_bytes: int, pool: list, seed: int, workdir: Path) -> None:
    import datasets

    datasets.disable_progress_bars()

    def rows():
        rng, written = np.random.default_rng(seed), 0
        while written < total_bytes:
            order = rng.permutation(len(pool))
            for start in range(0, len(order), 12):  # documents of 12 lines
                text = "".join(pool[i] for i in order[start : start + 12])
                written += len(text)
                yield {"text": text}

    cache = workdir / "arrow-cache"
    datasets.Dataset.from_generator(rows, cache_dir=str(cache)).save_to_disk(str(directory))
    shutil.rmtree(cache, ignore_errors=True)


def _status_kb() -> dict:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0])
    return fields


def _train_steps(model, stream, steps: int, batch_size: int, objective: str, vocabulary) -> tuple:
    """(blocks per second, fraction of the time spent waiting for a batch) over ``steps`` steps after a warm-up one."""
    import torch

    from swarmtrain.models import compute_loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    waited = seconds = 0.0
    for step in range(steps + 1):
        started = time.perf_counter()
        batch = next(stream)
        wait = time.perf_counter() - started
        compute_loss(model, batch, objective, generator, vocabulary).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step > 0:
            waited, seconds = waited + wait, seconds + time.perf_counter() - started
    return steps * batch_size / seconds, waited / seconds


def measure_peer(spec: dict) -> dict:
    """In a fresh process: a peer's data and model on one corpus (see the module doc)."""
    import torch

    from swarmtrain.config import load_run_config
    from swarmtrain.data import open_training_data
    from swarmtrain.models import build_model, objective_of

    torch.set_num_threads(1)
    config = load_run_config(spec["config"])
    data_config = config.data.model_copy(update={k: v for k, v in spec["data"].items()})
    started = time.perf_counter()
    data = open_training_data(data_config, None, b"benchmark-peer")
    opened, after_open = time.perf_counter() - started, _status_kb()
    loader = data.batches(64)
    next(loader)  # the first shards are tokenized
    started, blocks = time.perf_counter(), 0
    while blocks < spec["loader_blocks"]:
        blocks += len(next(loader))
    loader_seconds, after_loader = time.perf_counter() - started, _status_kb()
    model = build_model(config.model, data_config.seq_len, config.seed, data.vocabulary)
    model_rate, wait_fraction = _train_steps(model, data.batches(spec["batch"]), spec["steps"], spec["batch"],
                                             objective_of(config.model), data.vocabulary)
    done = data.position()["done"]
    data.close()
    end = _status_kb()
    return dict(open_seconds=round(opened, 2), shards=data.source.num_units, description=data.description,
                parameters=sum(p.numel() for p in model.parameters()), seq_len=data_config.seq_len,
                batch=spec["batch"], model_blocks_per_second=round(model_rate, 3),
                step_wait_fraction=round(wait_fraction, 5), loader_blocks=blocks,
                loader_blocks_per_second=round(blocks / loader_seconds, 1),
                loader_tokens_per_second=round(blocks * data_config.seq_len / loader_seconds),
                loader_to_model_ratio=round(blocks / loader_seconds / model_rate, 1),
                rss_after_open_mb=round(after_open["VmRSS"] / 1024, 1),
                data_peak_rss_mb=round(after_loader["VmHWM"] / 1024, 1), peak_rss_mb=round(end["VmHWM"] / 1024, 1),
                rss_anon_end_mb=round(end["RssAnon"] / 1024, 1), rss_file_end_mb=round(end["RssFile"] / 1024, 1),
                shards_done=int(np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(done)), np.uint8)).sum()))


def run_measurement(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise RuntimeError(f"measurement failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def describe_tokenizer(directory: Path, trained_here: bool, seconds: float = None) -> dict:
    from swarmtrain.data import load_tokenizer
    from swarmtrain.data.transfer import split_into_records

    tokenizer = load_tokenizer(str(directory))
    _, chunks = split_into_records(tokenizer.content)
    return dict(trained_in_this_run=trained_here, seconds=seconds, vocab_size=tokenizer.vocabulary.size,
                file_bytes=len(tokenizer.content), dht_records=len(chunks) + 1, sha256=tokenizer.sha256)


def train_benchmark_tokenizer(corpus: Path, out: Path) -> dict:
    from swarmtrain.data.training import train_tokenizer

    started = time.perf_counter()
    train_tokenizer(str(corpus), 32000, str(out), max_bytes=100 * 10**6, show_progress=False)
    return describe_tokenizer(out, trained_here=True, seconds=round(time.perf_counter() - started, 1))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["corpora"]
    labels = [f"{r['format']} {r['gigabytes']} GB" for r in runs]
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4))
    positions = np.arange(len(runs))
    memory.bar(positions - 0.2, [r["data_peak_rss_mb"] for r in runs], width=0.4, label="data only (before the model)")
    memory.bar(positions + 0.2, [r["peak_rss_mb"] for r in runs], width=0.4, label="with the model training")
    memory.set_xticks(positions, labels)
    memory.set_ylabel("peak RSS of the peer process (MB)")
    memory.set_title("memory vs corpus size (llama ~42M + AdamW)")
    memory.legend(loc="center left")
    memory.tick_params(axis="x", rotation=20)
    ratios = [r["loader_to_model_ratio"] for r in runs] + [report["demo"]["loader_to_model_ratio"]]
    speed.bar(labels + ["demo: bytes,\n2-layer GPT-2"], ratios, color="tab:green")
    speed.axhline(10, color="tab:red", linestyle="--", label="10x")
    speed.set_yscale("log")
    speed.set_ylabel("loader blocks/s / model blocks/s")
    speed.set_title("loader headroom (one core each)")
    speed.tick_params(axis="x", rotation=20)
    speed.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1,1,5", help="text corpora to generate, in GB")
    parser.add_argument("--arrow-sizes", default="0.1,1", help="save_to_disk corpora to generate, in GB ('' for none)")
    parser.add_argument("--workdir", default="/tmp/swarmtrain-databench")
    parser.add_argument("--steps", type=int, default=3, help="training steps of the llama model per corpus")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--loader-blocks", type=int, default=30_000, help="512-token blocks read from the loader alone")
    parser.add_argument("--tokenizer", help="a tokenizer directory to use instead of training one (step 2)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "data.json"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_peer(json.loads(args.measure))))
        return
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    pool = line_pool()
    llama = str(REPO / "configs" / "pretrain-llama.yaml")
    report = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
                  command="nice -n 15 python benchmarks/data.py " + " ".join(sys.argv[1:]), corpora=[])
    try:
        corpora = [("text", float(s)) for s in args.sizes.split(",") if s] + \
                  [("arrow", float(s)) for s in args.arrow_sizes.split(",") if s]
        for number, (kind, gigabytes) in enumerate(corpora):
            directory = workdir / f"{kind}-{gigabytes}"
            started = time.perf_counter()
            if kind == "text":
                write_text_corpus(directory, int(gigabytes * 1e9), pool, seed=number)
            else:
                write_arrow_corpus(directory, int(gigabytes * 1e9), pool, seed=number, workdir=workdir)
            written = time.perf_counter() - started
            if "tokenizer" not in report and args.tokenizer:
                shutil.copytree(args.tokenizer, workdir / "tokenizer")
                report["tokenizer"] = describe_tokenizer(workdir / "tokenizer", trained_here=False)
            elif "tokenizer" not in report:
                report["tokenizer"] = train_benchmark_tokenizer(directory, workdir / "tokenizer")
            print(f"tokenizer: {report['tokenizer']}", flush=True)
            data = dict(source="text" if kind == "text" else "datasets", path=str(directory),
                        tokenizer=str(workdir / "tokenizer"))
            result = run_measurement(dict(config=llama, data=data, steps=args.steps, batch=args.batch,
                                          loader_blocks=args.loader_blocks))
            disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
            report["corpora"].append(dict(format=kind, gigabytes=gigabytes, disk_bytes=disk,
                                          generate_seconds=round(written, 1), **result))
            print(json.dumps(report["corpora"][-1]), flush=True)
            shutil.rmtree(directory)
        report["demo"] = run_measurement(dict(config=str(REPO / "configs" / "tiny.yaml"), data={}, steps=60, batch=8,
                                              loader_blocks=200_000))
        print(f"demo: {json.dumps(report['demo'])}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    texts = {r["gigabytes"]: r for r in report["corpora"] if r["format"] == "text"}
    if texts:
        smallest, largest = texts[min(texts)], texts[max(texts)]
        report["peak_rss_growth_mb"] = round(largest["peak_rss_mb"] - smallest["peak_rss_mb"], 1)
    report["min_loader_to_model_ratio"] = min([r["loader_to_model_ratio"] for r in report["corpora"]]
                                              + [report["demo"]["loader_to_model_ratio"]])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(f"peak RSS growth from the smallest to the largest text corpus: {report.get('peak_rss_growth_mb')} MB; "
          f"lowest loader/model ratio: {report['min_loader_to_model_ratio']}x; wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
