"""ModelRunner.forward() alone on workload W's shapes: a decode step of 32 sequences (context
100..400, ~265 on average) and 1024- and 2048-token prefill chunks. Compares the oneDNN prepacked GEMMs
with plain F.linear side by side in one process (interleaved, best of N), or, with
--precisions, the precisions (dtype, KV-cache dtype, weight quantization) with the default GEMMs;
--profile adds torch.profiler's busiest ops of one decode step per system.

    .venv/bin/python benchmarks/model_forward.py --threads 2
    .venv/bin/python benchmarks/model_forward.py --threads 1 --clock cpu   # steadier on a shared box
    .venv/bin/python benchmarks/model_forward.py --precisions "fp32 bf16 bf16/kv8 bf16/int8" --profile
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from asyncpp.bench import make_workload_model, parse_layout
from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.core.stages import StageSpec
from asyncpp.engine_args import EngineArgs, EngineConfig, create_engine_config
from asyncpp.worker.model_runner import ModelRunner

NUM_BLOCKS = 1024
SAMPLE = SampleSpec(SamplingParams(temperature=0), None, 0)


def runner(model: str, onednn: bool, **precision: str) -> ModelRunner:
    precision = {"dtype": "float32", **precision}
    config = create_engine_config(EngineArgs(model=model, skip_tokenizer_init=True, device="cpu", onednn=onednn,
                                             **precision))
    return filled_runner(config, config.stages[0])


def filled_runner(config: EngineConfig, stage: StageSpec) -> ModelRunner:
    """A stage's runner with a KV cache of real pages: unwritten ones all read the zero page."""
    r = ModelRunner(config, stage)
    r.init_kv_cache(1, NUM_BLOCKS)
    for keys, values in r.kv_caches[0]:
        for t in (keys, values):
            t.random_(0, 120) if t.dtype == torch.uint8 else t.normal_()  # 8-bit: finite fp8 codes
    return r


def microbatches(seed: int = 0) -> dict[str, MicroBatch]:
    rng = random.Random(seed)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)

    def table(tokens: int) -> list[int]:
        return [free.pop() for _ in range(-(-tokens // 16))]

    decode = [SeqWork(i, [5], ctx - 1, table(ctx), SAMPLE)
              for i, ctx in enumerate(rng.randint(100, 400) for _ in range(32))]
    prompt = lambda n: [rng.randrange(3, 32000) for _ in range(n)]  # noqa: E731
    return {
        "decode 32 seqs": MicroBatch(0, decode),
        "prefill 4 x 256": MicroBatch(0, [SeqWork(300 + i, prompt(256), 0, table(256), SAMPLE) for i in range(4)]),
        "prefill 8 x 256": MicroBatch(0, [SeqWork(100 + i, prompt(256), 0, table(256), SAMPLE) for i in range(8)]),
        "prefill 1 x 2048": MicroBatch(0, [SeqWork(200, prompt(2048), 0, table(2048), SAMPLE)]),
    }


def best_ms(r: ModelRunner, mb: MicroBatch, repeats: int, clock) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        r.forward(mb, None)
        best = min(best, clock() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None, help="default: workload W")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time (all threads summed); steadier when cores are shared")
    parser.add_argument("--precisions", default=None,
                        help="compare these instead of the GEMMs, as layout options: 'fp32 bf16 bf16/kv8 fp32/int8'")
    parser.add_argument("--profile", action="store_true", help="print each system's busiest ops in a decode step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or str(make_workload_model())
    if args.precisions:
        precisions = {p: parse_layout("p1/" + p).precision for p in args.precisions.split()}
        runners = {p: runner(model, True, **pr.engine_kwargs()) for p, pr in precisions.items()}
    else:
        runners = {"oneDNN prepacked": runner(model, True), "F.linear (MKL)": runner(model, False)}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"torch threads: {args.threads}; best of {args.rounds} interleaved rounds, "
          f"ms of {args.clock} time per forward()")
    print(f"{'step':18s}" + "".join(f"{name:>20s}" for name in runners))
    for name, mb in microbatches().items():
        repeats = 5 if mb.num_tokens < 100 else 1
        times = {k: float("inf") for k in runners}
        for r in runners.values():
            r.forward(mb, None)  # warm-up
        for _ in range(args.rounds):
            for k, r in runners.items():
                times[k] = min(times[k], best_ms(r, mb, repeats, clock))
        print(f"{name:18s}" + "".join(f"{times[k]:20.1f}" for k in runners))
    if args.profile:
        for k, r in runners.items():
            profile(k, r, microbatches()["decode 32 seqs"])


def profile(name: str, r: ModelRunner, mb: MicroBatch) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            r.forward(mb, None)
    print(f"\n== {name}: decode 32 seqs, 5 steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
