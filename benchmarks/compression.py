"""Compression benchmarks: (a) selection speed/quality, (b) bytes on the wire per peer per round.

    nice -n 10 python benchmarks/compression.py            # full run -> benchmarks/results/compression.json
    python benchmarks/compression.py --quick               # smoke run in seconds -> compression_quick.json

(a) gaussiank vs topk vs randomk on Gaussian, Laplace, Student-t(3) data and on real gradients of a tiny
    GPT-2 (transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=260, n_positions=128), random
    bytes, gradients of successive micro-batches concatenated up to the size). Per case: median time,
    time ratio to torch.topk measured in the same run on the same tensor, count/k, and the share of the
    exact top-k's squared norm that the selection captures. One torch thread (shared 2-core machine;
    also keeps the ratio free of thread-scheduling noise).
(b) 4 forked peers on 127.0.0.1 with real hivemind DHTs average a ~1M-parameter gradient (four 512x512
    matrices) for a few rounds per codec; bytes are the protobuf-serialized sizes of the averaging
    messages each peer really sent / received (CompressionStats), not a formula.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmtrain.compression.selection import gaussiank, randomk, target_count, topk  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------- (a)
def tiny_gpt2_gradients(numel: int, seed: int = 0) -> torch.Tensor:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=260, n_positions=128)
    model = transformers.GPT2LMHeadModel(config)
    chunks, total = [], 0
    while total < numel:
        tokens = torch.randint(0, 256, (8, 128))
        model.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        chunks.append(flat)
        total += flat.numel()
    return torch.cat(chunks)[:numel].contiguous()


def make_data(distribution: str, numel: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if distribution == "gaussian":
        return torch.randn(numel, generator=generator)
    if distribution == "laplace":
        # sign times an exponential; the inverse-CDF form log1p(-2|u|) hits -inf when rand() returns 0
        signs = torch.randint(0, 2, (numel,), generator=generator).float() * 2 - 1
        return torch.empty(numel).exponential_(generator=generator) * signs
    if distribution == "student_t3":
        normal = torch.randn(numel, generator=generator)
        chi2 = torch.randn(numel, generator=generator) ** 2
        chi2 += torch.randn(numel, generator=generator) ** 2
        chi2 += torch.randn(numel, generator=generator) ** 2
        return normal / torch.sqrt(chi2 / 3)
    if distribution == "gpt2_grad":
        return tiny_gpt2_gradients(numel, seed)
    raise ValueError(distribution)


def time_call(function, x, density, repeats):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(x, density)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def bench_selection(sizes, distributions, densities, repeats):
    rows = []
    for numel in sizes:
        for distribution in distributions:
            if distribution == "gpt2_grad" and numel > 10_000_000:
                continue  # 50M would need ~400 backward passes of the model; 1M and 10M make the point
            x = make_data(distribution, numel)
            for density in densities:
                k = target_count(numel, density)
                topk_seconds, exact = time_call(topk, x, density, repeats)
                exact_energy = float(x[exact].double().pow(2).sum())
                for name, function in (("topk", topk), ("gaussiank", gaussiank), ("randomk", randomk)):
                    if name == "topk":
                        seconds, selected = topk_seconds, exact
                    else:
                        seconds, selected = time_call(function, x, density, repeats)
                    row = dict(
                        numel=numel, distribution=distribution, density=density, method=name, k=k,
                        seconds=seconds, time_ratio_to_topk=seconds / topk_seconds,
                        count_over_k=len(selected) / k,
                        captured_topk_energy=float(x[selected].double().pow(2).sum()) / exact_energy,
                    )
                    rows.append(row)
                    print(f"[select] {numel:>9} {distribution:>10} rho={density:<6g} {name:>9}: "
                          f"{seconds * 1e3:8.1f} ms  x{row['time_ratio_to_topk']:.2f} of topk  "
                          f"count/k={row['count_over_k']:.3f}  energy={row['captured_topk_energy']:.3f}",
                          flush=True)
            del x
    return rows


# ------------------------------------------------------------------------------------------- (b)
WIRE_CODEC_FILTER = None  # --codecs: run only these wire configurations


def _wire_configs(quick: bool):
    from hivemind.compression import BlockwiseQuantization, Float16Compression, NoCompression, Uniform8BitQuantization

    dense = [("none", NoCompression), ("fp16", Float16Compression),
             ("hivemind_uniform8bit", Uniform8BitQuantization), ("hivemind_blockwise8bit", BlockwiseQuantization)]
    sparse_densities = (0.01,) if quick else (0.1, 0.01, 0.001)
    configs = [dict(name=name, kind="dense", codec=codec) for name, codec in dense]
    configs.append(dict(name="hivemind_powersgd_rank4", kind="powersgd", rank=4))
    for method in ("topk", "gaussiank"):
        for density in sparse_densities:
            configs.append(dict(name=f"{method}:{density:g}", kind="sparse", spec=f"{method}:{density:g}"))
    configs.append(dict(name="gaussiank:0.01+8bit", kind="sparse", spec="gaussiank:0.01+8bit"))
    if WIRE_CODEC_FILTER:
        configs = [config for config in configs if config["name"] in WIRE_CODEC_FILTER or config["name"] == "fp16"]
    return configs


def _wire_peer(rank, num_peers, shapes, rounds, quick, address_queue, barrier, result_queue):
    import hivemind

    from swarmtrain.compression.averager import CountingPowerSGDGradientAverager, CountingGradientAverager
    from swarmtrain.compression.factory import make_averager_factory
    from swarmtrain.compression.spec import parse_compression_spec

    from hivemind.compression import BlockwiseQuantization, CompressionInfo

    torch.set_num_threads(1)
    # warm bitsandbytes up before any averager forks: its first call takes seconds, long enough for the
    # first round's reducers to drop this peer and average only their own share (hivemind then reports
    # "received 25% of input tensors" and a misleadingly small byte count)
    warm = torch.randn(4096)
    BlockwiseQuantization().compress(warm, CompressionInfo.from_tensor(warm))
    options = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=False, start=True)
    if rank == 0:
        dht = hivemind.DHT(**options)
        for _ in range(num_peers - 1):
            address_queue.put([str(a) for a in dht.get_visible_maddrs()])
    else:
        dht = hivemind.DHT(initial_peers=address_queue.get(timeout=60), **options)
    generator = torch.Generator().manual_seed(rank)
    try:
        for index, config in enumerate(_wire_configs(quick)):
            parameters = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
            common = dict(parameters=parameters, dht=dht, prefix=f"wirebench{index}", min_matchmaking_time=2.0,
                          request_timeout=1.0, target_group_size=num_peers, min_group_size=num_peers,
                          client_mode=False, next_chunk_timeout=5.0, warn=False, start=True)
            if config["kind"] == "dense":
                averager = CountingGradientAverager(compression=config["codec"](), **common)
            elif config["kind"] == "powersgd":
                averager = CountingPowerSGDGradientAverager(averager_rank=config["rank"], **common)
            else:
                averager = make_averager_factory(parse_compression_spec(config["spec"]))(**common)
            barrier.wait(120)
            for _ in range(rounds):
                for parameter in parameters:
                    # Laplace-distributed (heavy-tailed, like error-feedback-corrected gradients)
                    signs = torch.randint(0, 2, parameter.shape, generator=generator).float() * 2 - 1
                    parameter.grad = torch.empty(parameter.shape).exponential_(generator=generator) * signs
                averager.accumulate_grads_(batch_size=1)
                try:
                    averager.step(timeout=60)
                except Exception as e:
                    print(f"[wire] peer {rank} {config['name']}: round failed {e!r}", flush=True)
                averager.reset_accumulated_grads_()
            barrier.wait(120)  # every peer has its results; give the last answers time to be counted
            time.sleep(1.0)
            stats = averager.stats.snapshot()
            result_queue.put((rank, config["name"], stats))
            barrier.wait(120)  # nobody shuts down while others may still need its answers
            averager.shutdown()
    finally:
        dht.shutdown()


def bench_wire(num_peers, shapes, rounds, quick):
    context = mp.get_context("fork")
    address_queue, result_queue = context.Queue(), context.Queue()
    barrier = context.Barrier(num_peers)
    processes = [context.Process(target=_wire_peer, args=(rank, num_peers, shapes, rounds, quick, address_queue,
                                                          barrier, result_queue)) for rank in range(num_peers)]
    for process in processes:
        process.start()
    configs = _wire_configs(quick)
    per_config = {config["name"]: [] for config in configs}
    try:
        for _ in range(num_peers * len(configs)):
            rank, name, stats = result_queue.get(timeout=300)
            per_config[name].append(stats)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    numel = sum(torch.Size(shape).numel() for shape in shapes)
    rows = []
    for name, stats_list in per_config.items():
        rounds_ok = [s["rounds_ok"] for s in stats_list]
        sent = [s["bytes_sent_total"] / max(1.0, s["rounds_ok"] + s["rounds_failed"]) for s in stats_list]
        received = [s["bytes_received_total"] / max(1.0, s["rounds_ok"] + s["rounds_failed"]) for s in stats_list]
        rows.append(dict(
            codec=name, peers=num_peers, numel=numel, rounds=rounds, rounds_ok_per_peer=rounds_ok,
            bytes_sent_per_peer_per_round=statistics.mean(sent) if sent else None,
            bytes_received_per_peer_per_round=statistics.mean(received) if received else None,
            bytes_sent_max_peer=max(sent) if sent else None,
        ))
    baseline = next(row for row in rows if row["codec"] == "fp16")["bytes_sent_per_peer_per_round"]
    for row in rows:
        if row["bytes_sent_per_peer_per_round"]:
            row["reduction_vs_fp16"] = baseline / row["bytes_sent_per_peer_per_round"]
        print(f"[wire] {row['codec']:>24}: sent {row['bytes_sent_per_peer_per_round']:>12,.0f} B/peer/round  "
              f"received {row['bytes_received_per_peer_per_round']:>12,.0f}  "
              f"x{row.get('reduction_vs_fp16', float('nan')):.1f} less than fp16  ok={row['rounds_ok_per_peer']}",
              flush=True)
    return rows


# ------------------------------------------------------------------------------------------- (c)
def _markov_bytes(num_sequences, length, seed):
    """Sequences from a fixed sparse random bigram chain over 256 bytes: learnable, unlike random bytes."""
    table_generator = torch.Generator().manual_seed(1234)  # the same chain for every peer and the held-out set
    logits = torch.randn(256, 256, generator=table_generator) * 3.0
    transition = torch.softmax(logits, dim=-1)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.empty(num_sequences, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, 256, (num_sequences,), generator=generator)
    for position in range(1, length):
        tokens[:, position] = torch.multinomial(transition[tokens[:, position - 1]], 1, generator=generator)[:, 0]
    return tokens


def _make_inner_optimizer(optimizer_spec: str):
    """"adam:0.003", "sgd:0.3" (SGD with momentum 0.9, the optimizer of the GaussianK paper) or
    "frozenadam:0.003:20" (swarmtrain.training.frozen_adam: Adam, no weight decay like "adam", whose variance
    is updated by the first 20 epochs' gradients and then frozen)."""
    from functools import partial

    name, _, rest = optimizer_spec.partition(":")
    lr, _, freeze = rest.partition(":")
    if name == "sgd":
        return partial(torch.optim.SGD, lr=float(lr or 0.3), momentum=0.9)
    if name == "frozenadam":
        from swarmtrain.training.frozen_adam import FrozenVarianceAdamW

        if not freeze:
            raise SystemExit("--convergence-optimizer frozenadam:LR:W needs W, the epochs before the freeze")
        # +1: hivemind.Optimizer's zero-gradient initialisation step counts (as in make_torch_optimizer_factory)
        return partial(FrozenVarianceAdamW, lr=float(lr or 3e-3), eps=1e-8, weight_decay=0.0,
                       freeze_variance_after=int(freeze) + 1)
    if name != "adam":
        raise SystemExit(f"unknown --convergence-optimizer {optimizer_spec!r}: adam:LR, sgd:LR or frozenadam:LR:W")
    return partial(torch.optim.Adam, lr=float(lr or 3e-3))


class _DenseThenSparse:
    """Density 1 (every entry sent: dense averaging through the sparse codec) for the first
    ``dense_epochs`` rounds, then the spec's density: the dense warm-up of the 1-bit Adam recipe."""

    def __init__(self, density: float, dense_epochs: int):
        self.density, self.dense_epochs = density, dense_epochs

    def __call__(self, epoch: int) -> float:
        return 1.0 if epoch < self.dense_epochs else self.density


def _convergence_peer(rank, num_peers, spec, epochs, target_batch, address_queue, barrier, result_queue,
                      optimizer_spec="adam:0.003"):
    import hivemind
    import transformers

    from swarmtrain.compression.factory import make_averager_factory
    from swarmtrain.compression.feedback import DensitySchedule
    from swarmtrain.compression.spec import parse_compression_spec

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    options = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=False, start=True)
    if rank == 0:
        dht = hivemind.DHT(**options)
        for _ in range(num_peers - 1):
            address_queue.put([str(a) for a in dht.get_visible_maddrs()])
    else:
        dht = hivemind.DHT(initial_peers=address_queue.get(timeout=60), **options)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=260, n_positions=128)
    model = transformers.GPT2LMHeadModel(config)
    batch = 8
    # "gaussiank:0.01@warmup20": the spec with the density warm-up of the run config's
    # averaging.density_warmup_epochs (from 1/64 to the target density geometrically over 20 epochs);
    # "gaussiank:0.01@dense20": density 1 for 20 epochs, then 0.01 (the 1-bit Adam recipe's dense warm-up)
    spec, _, dense = spec.partition("@dense")
    spec, _, warmup = spec.partition("@warmup")
    schedule = None
    if warmup:
        density = float(spec.split(":")[1].split("+")[0])
        schedule = DensitySchedule(density, initial=max(density, 1 / 64), warmup_epochs=int(warmup))
    elif dense:
        schedule = _DenseThenSparse(float(spec.split(":")[1].split("+")[0]), int(dense))
        warmup = f"dense{dense}"
    optimizer = hivemind.Optimizer(
        dht=dht, run_id=f"convergence_{spec.replace(':', '_').replace('.', 'p').replace('+', '_')}_{warmup or 0}",
        params=model.parameters(), optimizer=_make_inner_optimizer(optimizer_spec), target_batch_size=target_batch,
        batch_size_per_step=batch, matchmaking_time=2.0, averaging_timeout=30.0, client_mode=False,
        average_state_every=10**6, grad_averager_factory=make_averager_factory(parse_compression_spec(spec),
                                                                      density_schedule=schedule, request_timeout=1.0),
        averager_opts=dict(request_timeout=1.0), verbose=False,
    )
    train = _markov_bytes(4096, 64, seed=100 + rank)
    held_out = _markov_bytes(256, 64, seed=99)
    barrier.wait(120)
    samples, step = 0, 0
    started = time.monotonic()
    while optimizer.local_epoch < epochs and time.monotonic() - started < 3600:
        tokens = train[(step * batch) % len(train):][:batch]
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        samples += batch
        step += 1
    model.eval()  # no dropout: the held-out loss must be a function of the parameters only
    with torch.no_grad():
        loss = float(model(input_ids=held_out, labels=held_out).loss)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    parameters_sha = hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
    result_queue.put((rank, dict(held_out_loss=loss, epochs=optimizer.local_epoch, local_samples=samples,
                                 parameters_sha=parameters_sha,
                                 seconds=time.monotonic() - started, **optimizer.grad_averager.stats.snapshot())))
    barrier.wait(120)
    optimizer.shutdown()
    dht.shutdown()


def bench_convergence(specs, num_peers, epochs, target_batch, optimizer_spec="adam:0.003"):
    rows = []
    for spec in specs:
        context = mp.get_context("fork")
        address_queue, result_queue = context.Queue(), context.Queue()
        barrier = context.Barrier(num_peers)
        processes = [context.Process(target=_convergence_peer, args=(rank, num_peers, spec, epochs, target_batch,
                                                                     address_queue, barrier, result_queue,
                                                                     optimizer_spec))
                     for rank in range(num_peers)]
        for process in processes:
            process.start()
        try:
            peers = sorted((result_queue.get(timeout=4000) for _ in range(num_peers)), key=lambda item: item[0])
        finally:
            for process in processes:
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
        row = dict(spec=spec, optimizer=optimizer_spec, peers=num_peers, epochs=epochs, target_batch_size=target_batch,
                   held_out_loss_per_peer=[p["held_out_loss"] for _, p in peers],
                   parameters_sha_per_peer=[p["parameters_sha"] for _, p in peers],
                   rounds_ok=[p["rounds_ok"] for _, p in peers], rounds_failed=[p["rounds_failed"] for _, p in peers],
                   bytes_sent_per_peer=[p["bytes_sent_total"] for _, p in peers],
                   seconds=max(p["seconds"] for _, p in peers))
        rows.append(row)
        print(f"[convergence] {spec:>16}: held-out loss {row['held_out_loss_per_peer']}  "
              f"rounds ok {row['rounds_ok']} failed {row['rounds_failed']}  sent {row['bytes_sent_per_peer']}  "
              f"params {row['parameters_sha_per_peer']}",
              flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds instead of minutes")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--skip-selection", action="store_true")
    parser.add_argument("--skip-wire", action="store_true")
    parser.add_argument("--convergence", action="store_true",
                        help="(c) also train the tiny GPT-2 in 3 peers: fp16 vs gaussiank:0.01 (minutes)")
    parser.add_argument("--convergence-specs", default="fp16,gaussiank:0.01",
                        help="comma-separated specs for (c); SPEC@warmupN adds a density warm-up of N epochs, "
                             "SPEC@denseN averages densely for N epochs first")
    parser.add_argument("--convergence-epochs", type=int, default=15, help="epochs (optimizer steps) per run in (c)")
    parser.add_argument("--convergence-target", type=int, default=1024, help="target batch size in (c)")
    parser.add_argument("--convergence-optimizer", default="adam:0.003",
                        help="inner optimizer in (c): adam:LR, sgd:LR (momentum 0.9) or frozenadam:LR:W "
                             "(Adam whose variance is frozen after W epochs)")
    parser.add_argument("--codecs", default=None, help="comma-separated wire configurations to run (fp16 always)")
    args = parser.parse_args()
    global WIRE_CODEC_FILTER
    WIRE_CODEC_FILTER = set(args.codecs.split(",")) if args.codecs else None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    output = args.output or RESULTS_DIR / ("compression_quick.json" if args.quick else "compression.json")
    # a partial run (--skip-*) updates its own sections and keeps the others from the existing file
    results = json.loads(output.read_text()) if output.exists() else {}
    results.update(
        command="python benchmarks/compression.py" + (" --quick" if args.quick else ""),
        quick=args.quick, torch=torch.__version__, python=platform.python_version(),
        machine=f"{platform.machine()}, {os.cpu_count()} cpus (shared)", torch_threads=1,
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    if not args.skip_selection:
        if args.quick:
            results["selection"] = bench_selection([1_000_000], ["gaussian", "laplace"], [0.01], repeats=1)
        else:
            results["selection"] = bench_selection(
                [1_000_000, 10_000_000, 50_000_000], ["gaussian", "laplace", "student_t3", "gpt2_grad"],
                [0.1, 0.01, 0.001], repeats=3,
            )
    if not args.skip_wire:
        shapes = [(128, 128)] * 4 if args.quick else [(512, 512)] * 4
        results["wire"] = bench_wire(num_peers=4, shapes=shapes, rounds=1 if args.quick else 3, quick=args.quick)
    if args.convergence:
        budget = dict(epochs=args.convergence_epochs, target_batch=args.convergence_target)
        key = "convergence" if budget == dict(epochs=15, target_batch=1024) else \
            f"convergence_{args.convergence_epochs}x{args.convergence_target}"
        if args.convergence_optimizer != "adam:0.003":
            key += "_" + args.convergence_optimizer.replace(":", "_")
        results[key] = bench_convergence(
            args.convergence_specs.split(","), num_peers=3, epochs=3 if args.quick else budget["epochs"],
            target_batch=384 if args.quick else budget["target_batch"], optimizer_spec=args.convergence_optimizer,
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
