"""Tensor-parallel communication on CPU: how to all-reduce, and what it costs per step.

1. Collectives, side by side in one run (methods alternate in rounds): gloo's
   `all_reduce`; point-to-point exchange (isend/irecv, then add; recursive doubling
   beyond 2 ranks); asyncpp's shared-memory all-reduce (asyncpp.worker.shm_collectives).
   For each shape: median microseconds per call, and whether every rank ended with
   bit-identical results equal to the rank-order sum.
2. Steps of workload W's model at T ranks (ModelRunner, one process per rank): prefill
   steps of 2048 tokens (8 sequences x 256) and decode steps of 32 sequences, with the
   TP group on shared memory and on gloo, beside T = 1 (rank 0 alone with every core),
   in alternating rounds: step time, time inside TP collectives (waits for the peer
   included), collectives per step.

    .venv/bin/python benchmarks/tp_allreduce.py [--tp 2] [--rounds 5] [--skip-steps]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from asyncpp.worker.tp_comm import TPCommunicator, make_tp_communicator  # noqa: E402
from asyncpp.worker.world import free_tcp_port  # noqa: E402

SHAPES = "1x4096 32x512 2048x512"
PREFILL_SEQS, PREFILL_LEN, DECODE_SEQS, BLOCK = 8, 256, 32, 16


# -- all-reduce methods ------------------------------------------------------------
def gloo_all_reduce(t: torch.Tensor, tp: TPCommunicator) -> None:
    dist.all_reduce(t, group=tp.group)


def p2p_all_reduce(t: torch.Tensor, tp: TPCommunicator) -> None:
    """Recursive doubling: at distance d, swap partial sums with rank ^ d, lower block first."""
    other = torch.empty_like(t)
    distance = 1
    while distance < tp.size:
        peer = tp.rank ^ distance
        ops = [dist.P2POp(dist.isend, t, tp.ranks[peer]), dist.P2POp(dist.irecv, other, tp.ranks[peer])]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if tp.rank < peer:
            t.add_(other)
        else:
            torch.add(other, t, out=t)
        distance *= 2


def shm_all_reduce(t: torch.Tensor, tp: TPCommunicator) -> None:
    tp.shm.all_reduce(t)


METHODS = {"gloo": gloo_all_reduce, "p2p": p2p_all_reduce, "shm": shm_all_reduce}


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.lower().split("x"))


def iterations(shape: tuple[int, ...], budget_bytes: float = 64e6) -> int:
    nbytes = 4 * torch.Size(shape).numel()
    return max(5, min(300, int(budget_bytes / nbytes)))


def check_exact(method, tp: TPCommunicator, shape: tuple[int, ...]) -> bool:
    """Bit-identical on every rank and equal to slot 0 + slot 1 + ... in rank order."""
    torch.manual_seed(1000 + tp.rank)
    mine = torch.randn(shape)
    parts = [torch.empty_like(mine) for _ in range(tp.size)]
    dist.all_gather(parts, mine, group=tp.group)
    expected = parts[0].clone()
    for p in parts[1:]:
        expected += p
    result = mine.clone()
    method(result, tp)
    results = [torch.empty_like(result) for _ in range(tp.size)]
    dist.all_gather(results, result, group=tp.group)
    ok = torch.tensor([int(all(torch.equal(r, results[0]) for r in results) and torch.equal(result, expected))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=tp.group)
    return bool(ok.item())


def time_collectives(tp: TPCommunicator, shapes: list[tuple[int, ...]], methods: list[str], rounds: int) -> dict:
    times: dict[tuple, list[float]] = {(s, m): [] for s in shapes for m in methods}
    exact = {(s, m): check_exact(METHODS[m], tp, s) for s in shapes for m in methods}
    for _ in range(rounds):
        for shape in shapes:
            t, n = torch.randn(shape) * 1e-3, iterations(shape)
            for name in methods:
                dist.barrier(group=tp.group)
                start = time.perf_counter()
                for _ in range(n):
                    METHODS[name](t, tp)
                times[(shape, name)].append((time.perf_counter() - start) / n)
    return {"median_us": {f"{'x'.join(map(str, s))}/{m}": 1e6 * statistics.median(v) for (s, m), v in times.items()},
            "exact": {f"{'x'.join(map(str, s))}/{m}": exact[(s, m)] for s, m in exact}}


# -- model steps -------------------------------------------------------------------
def step_batches(context: int, decode_steps: int):
    """Prefill microbatches (8 x 256 tokens) filling 32 sequences, then their decode steps."""
    from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
    from asyncpp.core.sampling_params import SamplingParams

    greedy = SamplingParams(temperature=0, ignore_eos=True)
    per_seq = (context + decode_steps + BLOCK) // BLOCK
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(DECODE_SEQS)]
    prompt = [3 + (7 * i) % 900 for i in range(context)]
    prefills = [MicroBatch(0, [SeqWork(i, prompt, 0, tables[i], SampleSpec(greedy, None, 0))
                               for i in range(b, b + PREFILL_SEQS)])
                for b in range(0, DECODE_SEQS, PREFILL_SEQS)]
    decodes = [MicroBatch(0, [SeqWork(i, [5 + i], context + k, tables[i], SampleSpec(greedy, None, 1 + k))
                              for i in range(DECODE_SEQS)]) for k in range(decode_steps)]
    return prefills, decodes, DECODE_SEQS * per_seq


def make_runner(model: str, tp_size: int, tp_rank: int, tp: object, blocks: int):
    from asyncpp.engine_args import EngineArgs, create_engine_config
    from asyncpp.worker.model_runner import ModelRunner

    args = EngineArgs(model=model, tensor_parallel_size=tp_size, dtype="float32", device="cpu",
                      skip_tokenizer_init=True, distributed_executor_backend="mp" if tp_size > 1 else None)
    config = create_engine_config(args)
    runner = ModelRunner(config, config.stage(tp_rank), tp)
    runner.init_kv_cache(1, blocks)
    return runner


def run_steps(runner, tp: TPCommunicator | None, batches) -> dict[str, list[float]]:
    """Seconds per step and seconds inside collectives per step, by step kind."""
    out: dict[str, list[float]] = {}
    for kind, mbs in zip(("prefill", "decode"), batches):
        for mb in mbs:
            comm0, calls0 = (tp.comm_s, tp.calls) if tp else (0.0, 0)
            start = time.perf_counter()
            runner.execute(mb, None)
            out.setdefault(f"{kind}/step", []).append(time.perf_counter() - start)
            if tp:
                out.setdefault(f"{kind}/comm", []).append(tp.comm_s - comm0)
                out.setdefault(f"{kind}/calls", []).append(tp.calls - calls0)
    return out


def time_steps(tp: TPCommunicator, model: str, rounds: int, decode_steps: int, threads: int) -> dict:
    """Rounds alternate T = 1 (rank 0 with every core, the peers waiting in a barrier),
    T ranks on shared memory and T ranks on gloo, so a change of machine load hits all three."""
    prefills, decodes, blocks = step_batches(PREFILL_LEN, decode_steps)
    runner = make_runner(model, tp.size, tp.rank, tp, blocks)
    single = make_runner(model, 1, 0, None, blocks) if tp.rank == 0 else None
    shm, results = tp.shm, {}
    for r in range(rounds + 1):  # round 0 warms up
        for layout in ("T=1 -", f"T={tp.size} shm", f"T={tp.size} gloo"):
            dist.barrier(group=tp.group)
            if layout.startswith("T=1 "):
                measured = run_single(single, (prefills, decodes), threads * tp.size, threads)
            else:
                tp.shm = shm if layout.endswith("shm") else None
                measured = run_steps(runner, tp, (prefills, decodes))
            for key, values in measured.items():
                if r > 0:
                    results.setdefault(f"{layout}/{key}", []).extend(values)
    tp.shm = shm
    return {key: statistics.median(values) for key, values in results.items()}


def run_single(runner, batches, threads: int, restore: int) -> dict[str, list[float]]:
    if runner is None:
        return {}
    torch.set_num_threads(threads)
    try:
        return run_steps(runner, None, batches)
    finally:
        torch.set_num_threads(restore)


# -- processes and report ----------------------------------------------------------
def rank_main(rank: int, world: int, port: int, opts: dict, result_path: str) -> None:
    torch.set_num_threads(opts["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tp = make_tp_communicator(1, world, rank, "auto")
        assert tp.shm is not None, "shared memory is not available between these ranks"
        report = {"collectives": time_collectives(tp, opts["shapes"], opts["methods"], opts["rounds"])}
        if opts["model"]:
            report["steps"] = time_steps(tp, opts["model"], opts["step_rounds"], opts["decode_steps"],
                                         opts["threads"])
        if rank == 0:
            Path(result_path).write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def format_collectives(report: dict, shapes: list[str], methods: list[str]) -> str:
    head = f"{'shape':>10}  " + "  ".join(f"{m + ' us':>9}" for m in methods) + "  " + \
        "  ".join(f"{'gloo/' + m:>9}" for m in methods if m != "gloo") + "  exact (all ranks identical, rank-order sum)"
    lines = [head]
    for s in shapes:
        us = report["median_us"]
        row = f"{s:>10}  " + "  ".join(f"{us[f'{s}/{m}']:9.1f}" for m in methods)
        if "gloo" in methods:
            row += "  " + "  ".join(f"{us[f'{s}/gloo'] / us[f'{s}/{m}']:8.1f}x" for m in methods if m != "gloo")
        row += "  " + " ".join(f"{m}={'yes' if report['exact'][f'{s}/{m}'] else 'NO'}" for m in methods)
        lines.append(row)
    return "\n".join(lines)


def format_steps(steps: dict) -> str:
    lines = [f"{'step':>8}  {'layout':>6}  {'TP comm':>7}  {'step ms':>8}  {'comm ms':>8}  {'comm %':>6}  "
             f"{'collectives':>11}  {'vs T=1':>6}"]
    for kind in ("prefill", "decode"):
        base = steps.get(f"T=1 -/{kind}/step")
        for key in sorted(k for k in steps if k.endswith(f"/{kind}/step")):
            layout, transport = key.split("/")[0].split()
            step = steps[key]
            comm = steps.get(key.replace("/step", "/comm"), 0.0)
            calls = steps.get(key.replace("/step", "/calls"), 0)
            speed = f"{base / step:5.2f}x" if base else "-"
            lines.append(f"{kind:>8}  {layout:>6}  {transport:>7}  {1e3 * step:8.2f}  {1e3 * comm:8.2f}  "
                         f"{100 * comm / step:5.1f}%  {int(calls):>11}  {speed:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="ranks in the TP group")
    parser.add_argument("--shapes", default=SHAPES, help="all-reduce shapes (fp32), e.g. '1x4096 32x512'")
    parser.add_argument("--methods", default="gloo p2p shm")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every method x shape (collectives)")
    parser.add_argument("--step-rounds", type=int, default=2, help="rounds of the model steps per transport")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps per round")
    parser.add_argument("--model", default=None, help="model folder for the steps (default: workload W)")
    parser.add_argument("--skip-steps", action="store_true", help="collectives only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default cores // tp)")
    parser.add_argument("--json", dest="json_out", default=None)
    ns = parser.parse_args(argv)
    from asyncpp.engine_args import available_cores

    threads = ns.threads or max(1, available_cores() // ns.tp)
    methods = ns.methods.split()
    if ns.tp & (ns.tp - 1) and "p2p" in methods:
        methods.remove("p2p")  # recursive doubling needs a power of two
    model = None
    if not ns.skip_steps:
        from asyncpp.bench import make_workload_model
        model = str(ns.model or make_workload_model())
    opts = {"shapes": [parse_shape(s) for s in ns.shapes.split()], "methods": methods, "rounds": ns.rounds,
            "model": model, "step_rounds": ns.step_rounds, "decode_steps": ns.decode_steps, "threads": threads}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="asyncpp-tp-allreduce-") as tmp:
        result_path = str(Path(tmp, "result.json"))  # rank 0 writes it
        mp.spawn(rank_main, args=(ns.tp, free_tcp_port(), opts, result_path), nprocs=ns.tp, join=True)
        report = json.loads(Path(result_path).read_text())
    print(f"T={ns.tp} ranks, {threads} thread(s) each, {available_cores()} cores, load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; torch {torch.__version__}")
    print("\nall-reduce, fp32, median per call:")
    print(format_collectives(report["collectives"], ns.shapes.split(), methods))
    if "steps" in report:
        print(f"\nmodel steps ({model}): prefill = {PREFILL_SEQS} x {PREFILL_LEN} tokens, decode = "
              f"{DECODE_SEQS} sequences; medians; comm = time inside TP collectives (waits included)")
        print(format_steps(report["steps"]))
    if ns.json_out:
        Path(ns.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json_out).write_text(json.dumps({"tp": ns.tp, "threads": threads, **report}, indent=1))
    return 0 if all(report["collectives"]["exact"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
