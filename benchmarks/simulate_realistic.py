"""Should the realistic configs average locally with sparse deltas? Their own model families, optimizers,
tokenizers and data path, scaled to this machine, in the simulator (issue #14, "the realistic configs
use the winner").

    python benchmarks/simulate_realistic.py                        # both families, 2 seeds (~60 min, 2 cores)
    python benchmarks/simulate_realistic.py --families llama --seeds 0 --steps 300   # a quick look

What it runs. A text corpus is assembled from this Python's standard library sources (611 files, ~12 MB;
no download) under --workdir, and the organiser's step of the README is done on it: `swarmtrain tokenizer
train` (byte-level BPE for llama, unigram for ALBERT, 4096 tokens). Then each family starts from its
realistic config file and shrinks only the sizes (the --set overrides are in the JSON):

  llama   configs/pretrain-llama.yaml: llama, 4 layers of 128, AdamW (betas 0.9/0.95, wd 0.1), causal LM
  albert  configs/pretrain-albert.yaml: ALBERT, 4 shared layers of 128, LAMB, masked LM

Four peers, batch 8 of 64 tokens, --steps local steps each. An epoch is peers x batch x --period samples,
so every configuration averages once per epoch -- the same number of rounds and samples for all, which is
what costs wall time on home links -- and differs only in what a round sends and how it is applied:

  sync_fp16    mode sync: the realistic configs today (fp16 gradients of the epoch's batch, one optimizer
               step per epoch)
  sync_fp16_lr2  the same with twice the learning rate (a larger batch takes a larger step)
  diloco       mode local, steps:PERIOD, dense float32 deltas, outer Nesterov (lr 0.7, momentum 0.9)
  sparseloco   mode local, steps:PERIOD, gaussiank:0.03+2bit, error feedback decayed by 0.95, plain outer
               step of lr --sparse-outer-lr (the recipe of configs/tiny-local.yaml)

Reported per family and configuration: final held-out loss (mean, sd over seeds), ratios to sync_fp16 and
diloco, averaging bytes per peer (from the encoded messages) and the reduction against sync_fp16; a learning
curve per family (PNG). JSON: benchmarks/results/simulate_realistic.json.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from simulate_common import RESULTS, plot_curves, run_jobs, summarise, write

ROOT = Path(__file__).resolve().parent.parent
CORPUS_PACKAGES = ("asyncio", "email", "concurrent", "importlib", "multiprocessing", "xml", "http", "logging", "json",
                   "unittest", "idlelib", "tkinter", "ctypes", "urllib", "sqlite3", "pydoc_data")
FAMILIES = {
    "llama": dict(config=ROOT / "configs" / "pretrain-llama.yaml", tokenizer="bpe", overrides=[
        "model.config.hidden_size=128", "model.config.intermediate_size=352", "model.config.num_hidden_layers=4",
        "model.config.num_attention_heads=4", "model.config.num_key_value_heads=4",
        "model.config.max_position_embeddings=128"], lr=0.002),
    "albert": dict(config=ROOT / "configs" / "pretrain-albert.yaml", tokenizer="unigram", overrides=[
        "model.config.embedding_size=64", "model.config.hidden_size=128", "model.config.num_hidden_layers=4",
        "model.config.num_attention_heads=4", "model.config.intermediate_size=512"], lr=0.002),
}


def build_corpus(workdir: Path) -> Path:
    """The standard library's own sources (no tests), copied once: top-level modules and a few packages."""
    corpus = workdir / "corpus"
    if corpus.exists():
        return corpus
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    staging = workdir / "corpus.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in stdlib.glob("*.py"):
        shutil.copy(path, staging / path.name)
    for package in CORPUS_PACKAGES:
        for path in (stdlib / package).rglob("*.py"):
            relative = path.relative_to(stdlib)
            if {"test", "tests", "__pycache__"} & set(relative.parts):
                continue
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, staging / relative)
    staging.rename(corpus)
    return corpus


def build_tokenizer(workdir: Path, corpus: Path, kind: str, vocab_size: int) -> Path:
    out = workdir / f"tokenizer-{kind}-{vocab_size}"
    if not (out / "tokenizer.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "swarmtrain", "tokenizer", "train", "--data", str(corpus),
                        "--vocab-size", str(vocab_size), "--kind", kind, "--out", str(out), "--max-bytes", "all"],
                       check=True)
    return out


def configurations(period: int, sparse_outer_lr: float, lr: float) -> dict:
    """Each one's whole averaging section: whatever the config file sets that it does not use is removed
    (an empty --set value restores the default)."""
    local = ["averaging.mode=local", f"averaging.schedule=steps:{period}"]
    sync = ["averaging.mode=sync", "averaging.compression=fp16"] + [
        f"averaging.{name}=" for name in ("schedule", "outer_lr", "outer_momentum", "feedback_decay", "max_period")]
    return {
        "sync_fp16": sync,
        "sync_fp16_lr2": sync + [f"optimizer.lr={2 * lr:g}"],
        "diloco": local + ["averaging.compression=none", "averaging.feedback_decay=", "averaging.outer_lr=0.7",
                           "averaging.outer_momentum=0.9"],
        "sparseloco": local + ["averaging.compression=gaussiank:0.03+2bit", "averaging.feedback_decay=0.95",
                               f"averaging.outer_lr={sparse_outer_lr:g}", "averaging.outer_momentum=0"],
    }


def report(results, families, names) -> dict:
    """Per family and configuration: simulate_common.summarise's loss and bytes, with the ratios to the
    sync fp16 and DiLoCo anchors."""
    by_name = summarise(results)
    summary = {}
    for family in families:
        entries = {name: dict(mean=by_name[f"{family}/{name}"]["mean"], stdev=by_name[f"{family}/{name}"]["stdev"],
                              seeds=len(by_name[f"{family}/{name}"]["seeds"]),
                              bytes_sent_per_peer=by_name[f"{family}/{name}"]["bytes_sent_per_peer"])
                   for name in names if f"{family}/{name}" in by_name}
        for name, entry in entries.items():
            for anchor in ("sync_fp16", "diloco"):
                if anchor in entries:
                    entry[f"loss_vs_{anchor}"] = entry["mean"] / entries[anchor]["mean"]
            if "sync_fp16" in entries and entry["bytes_sent_per_peer"] > 0:
                entry["bytes_reduction_vs_sync_fp16"] = entries["sync_fp16"]["bytes_sent_per_peer"] / entry["bytes_sent_per_peer"]
            print(f"{family:>7} {name:>14}: loss {entry['mean']:.4f} ± {entry['stdev']:.4f} ({entry['seeds']} seeds)"
                  + "".join(f", {entry[k]:.3f}x {k[8:]}" for k in ("loss_vs_sync_fp16", "loss_vs_diloco") if k in entry)
                  + f", {entry['bytes_sent_per_peer'] / 1e6:.2f} MB/peer"
                  + (f" ({entry['bytes_reduction_vs_sync_fp16']:.0f}x fewer)" if "bytes_reduction_vs_sync_fp16" in entry else ""))
        summary[family] = entries
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llama,albert")
    parser.add_argument("--configurations", default="sync_fp16,sync_fp16_lr2,diloco,sparseloco")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000, help="local steps per peer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--period", type=int, default=5, help="local steps per peer between rounds (= one epoch)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up epochs")
    parser.add_argument("--sparse-outer-lr", type=float, default=2.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/swarmtrain-realistic")
    parser.add_argument("--output", default=str(RESULTS / "simulate_realistic.json"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --output, run the rest")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    corpus = build_corpus(workdir)
    families = args.families.split(",")
    names = args.configurations.split(",")
    epochs = args.steps // args.period
    jobs = []
    for family in families:
        spec = FAMILIES[family]
        tokenizer = build_tokenizer(workdir, corpus, spec["tokenizer"], args.vocab_size)
        lr = spec["lr"]
        common = spec["overrides"] + [f"optimizer.lr={lr:g}",
            f"data.path={corpus}", f"data.tokenizer={tokenizer}", f"data.seq_len={args.seq_len}", "data.heldout_blocks=64",
            "data.shard_bytes=262144", f"target_batch_size={args.peers * args.batch_size * args.period}",
            f"optimizer.total_epochs={epochs}", f"optimizer.warmup_epochs={args.warmup}"]
        for name, overrides in configurations(args.period, args.sparse_outer_lr, lr).items():
            if name not in names:
                continue
            for seed in (int(s) for s in args.seeds.split(",")):
                jobs.append(dict(name=f"{family}/{name}", config=str(spec["config"]), overrides=common + overrides,
                                 options=dict(peers=args.peers, steps=args.steps, batch_size=args.batch_size, seed=seed,
                                              eval_every=args.eval_every)))
    output = Path(args.output)
    extra = dict(arguments=vars(args))
    results = run_jobs(jobs, args.jobs, output, extra, resume=args.resume)
    for result in results:
        result["family"], _, result["configuration"] = result["name"].partition("/")
    extra["report"] = report(results, families, names)
    write(output, results, extra)
    for family in families:
        plot_curves(results, output.with_name(f"{output.stem}_{family}.png"),
                    f"{family}: {args.peers} peers x {args.steps} local steps, a round every {args.period}",
                    [f"{family}/{name}" for name in names])


if __name__ == "__main__":
    main()
