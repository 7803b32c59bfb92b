"""What the `mp` executor's control path costs per decode step, beside a decode step itself.

1. The pipe alone, for one 32-sequence decode microbatch: pickle once (engine), then per
   rank send_bytes + recv_bytes + unpickle (a spawned echo process answers each one).
2. The whole executor path, side by side on the same model: `uni` (in-process thread) vs
   `mp` with one rank (pipes, reader thread, worker loop), decode steps of 32 sequences.
   Overhead = wall time per step - the rank's compute time per step. The KV cache is
   left unfilled: a decode step costs the same whatever the cached values are.

    .venv/bin/python benchmarks/control_channel.py [--model DIR] [--steps 30]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import time

import anyio

from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine_args import EngineArgs, create_engine_config
from asyncpp.executor.base import Executor
from asyncpp.executor.mp import MultiprocExecutor
from asyncpp.executor.uni import UniExecutor

SEQS, CONTEXT, BLOCK = 32, 256, 16


def decode_microbatch(step: int, context: int = CONTEXT) -> MicroBatch:
    per_seq = (context + step + BLOCK) // BLOCK
    params = SamplingParams(temperature=0, max_tokens=128)
    return MicroBatch(0, [SeqWork(i, [100 + i], context + step, list(range(i * per_seq, (i + 1) * per_seq)),
                                  SampleSpec(params, None, step)) for i in range(SEQS)], step)


def _echo(inbox, outbox) -> None:
    while data := inbox.recv_bytes():
        pickle.loads(data)
        outbox.send_bytes(b"k")


def pipe_costs(repeats: int = 2000) -> dict[str, float]:
    mb = decode_microbatch(0)
    start = time.perf_counter()
    for _ in range(repeats):
        data = pickle.dumps(("run", mb), protocol=pickle.HIGHEST_PROTOCOL)
    pickle_us = (time.perf_counter() - start) / repeats * 1e6
    start = time.perf_counter()
    for _ in range(repeats):
        pickle.loads(data)
    unpickle_us = (time.perf_counter() - start) / repeats * 1e6
    ctx = mp.get_context("spawn")
    inbox_r, inbox_w = ctx.Pipe(duplex=False)
    outbox_r, outbox_w = ctx.Pipe(duplex=False)
    echo = ctx.Process(target=_echo, args=(inbox_r, outbox_w), daemon=True)
    echo.start()
    for _ in range(50):
        inbox_w.send_bytes(data)
        outbox_r.recv_bytes()
    start = time.perf_counter()
    for _ in range(repeats):
        inbox_w.send_bytes(data)
        outbox_r.recv_bytes()
    round_trip_us = (time.perf_counter() - start) / repeats * 1e6
    inbox_w.send_bytes(b"")
    echo.join()
    return {"bytes": len(data), "pickle_us": pickle_us, "unpickle_us": unpickle_us,
            "send_recv_unpickle_ack_us": round_trip_us}


async def step_times_ms(executor: Executor, steps: int) -> tuple[float, float]:
    """(wall, compute) milliseconds per decode step; compute is the rank's busy time."""
    async with anyio.create_task_group() as tg:
        try:
            await executor.start(tg)
            await executor.init_kv_cache(SEQS * ((CONTEXT + steps + 2 * BLOCK) // BLOCK))
            await executor.submit(decode_microbatch(0, CONTEXT + steps))  # warm-up
            busy_before = executor.stats().stage_busy_s[0]
            start = time.perf_counter()
            for step in range(steps):
                await executor.submit(decode_microbatch(step, CONTEXT + steps))
            wall = (time.perf_counter() - start) / steps * 1e3
            return wall, (executor.stats().stage_busy_s[0] - busy_before) / steps * 1e3
        finally:
            await executor.shutdown()
            tg.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder (default: the bundled SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    ns = parser.parse_args()
    costs = pipe_costs()
    print(f"32-seq decode microbatch: {costs['bytes']} bytes pickled")
    print(f"  pickle (once per step)            {costs['pickle_us']:8.0f} us")
    print(f"  unpickle (per rank)               {costs['unpickle_us']:8.0f} us")
    print(f"  send+recv+unpickle+ack (per rank) {costs['send_recv_unpickle_ack_us']:8.0f} us")
    args = dict(model=ns.model, dtype="float32", device="cpu", skip_tokenizer_init=True,
                num_threads=ns.threads, kv_cache_memory="1GiB", max_model_len=2048)
    uni_cfg = create_engine_config(EngineArgs(**args))
    mp_cfg = create_engine_config(EngineArgs(**args, distributed_executor_backend="mp"))
    print(f"decode step, 32 seqs x {CONTEXT} context, {uni_cfg.threads_per_rank} thread(s) per rank:")
    print(f"  {'':34} {'wall':>9} {'compute':>9} {'overhead':>9}  (ms per step)")
    for name, executor in (("uni (thread in the engine)", UniExecutor(uni_cfg)),
                           ("mp, one rank (pipes + process)", MultiprocExecutor(mp_cfg))):
        wall, compute = anyio.run(step_times_ms, executor, ns.steps)
        print(f"  {name:34} {wall:9.2f} {compute:9.2f} {wall - compute:9.2f}")

if __name__ == "__main__":
    main()
