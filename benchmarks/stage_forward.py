"""Each pipeline stage's forward alone, on workload W's decode step: what one stage costs for
32 sequences as one microbatch (V=1) and as two of 16 (V=2), at the thread count the stage
process gets (cores // P). Shows how unequal the stages are (the last one carries the LM
head and the sampler) and what halving the microbatch costs per token.

    .venv/bin/python benchmarks/stage_forward.py                         # P=2, even split
    .venv/bin/python benchmarks/stage_forward.py --pp-layer-partition 5,3
"""
from __future__ import annotations

import argparse
import time

import torch
from model_forward import filled_runner, microbatches

from asyncpp.bench import make_workload_model
from asyncpp.core.microbatch import MicroBatch
from asyncpp.engine_args import EngineArgs, available_cores, create_engine_config
from asyncpp.worker.model_runner import ModelRunner


def stage_runners(model: str, pp: int, partition: str | None) -> list[ModelRunner]:
    config = create_engine_config(EngineArgs(model=model, skip_tokenizer_init=True, dtype="float32", device="cpu",
                                             pipeline_parallel_size=pp, pp_layer_partition=partition))
    return [filled_runner(config, stage) for stage in config.stages]


def best_ms(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2, help="pipeline stages")
    parser.add_argument("--pp-layer-partition", default=None, help="layers per stage, e.g. 5,3 (default even)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default cores // pp)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    threads = args.threads or max(1, available_cores() // args.pp)
    torch.set_num_threads(threads)
    runners = stage_runners(str(make_workload_model()), args.pp, args.pp_layer_partition)
    whole = microbatches()["decode 32 seqs"]
    halves = [MicroBatch(0, whole.seqs[:16]), MicroBatch(0, whole.seqs[16:])]
    print(f"decode step of 32 sequences, {threads} torch thread(s) per stage, best of {args.rounds}, ms")
    print(f"{'stage':8s}{'layers':>8s}{'1 x 32':>10s}{'2 x 16':>10s}{'2x16 / 1x32':>14s}")
    for r in runners:
        hidden = {} if r.stage.is_first else {
            n: {k: torch.randn(n, r.config.shape.hidden_size) for k in r.model.intermediate_keys} for n in (16, 32)}
        one = best_ms(lambda: r.execute(whole, hidden.get(32)), args.rounds)
        two = best_ms(lambda: [r.execute(h, hidden.get(16)) for h in halves], args.rounds)
        layers = r.config.layer_partition[r.stage.pp_rank]
        print(f"{r.stage.pp_rank:<8d}{layers:>8g}{one:10.1f}{two:10.1f}{two / one:14.2f}")


if __name__ == "__main__":
    main()
