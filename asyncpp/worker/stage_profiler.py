"""Time the pieces of a model at start-up, for the automatic layer partition.

Each piece is a stage of its own, built by the ModelRunner the stages use, with its real
weights (only its own tensors are read): a stage with no layers (what every stage pays), the
first stage with no layers (the embedding), the last with no layers (final norm, LM head,
sampler), and one layer's attention half or MLP half alone, once per kind of half (windowed
or not; dense or MoE). Each runs a decode step and a prefill chunk on the threads a stage
gets; a piece's time is its median less the bare stage's.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from asyncpp.core.config import COST_CONTEXT, COST_SEQS, EngineConfig
from asyncpp.core.microbatch import IntermediateTensors, MicroBatch, SampleSpec, SeqWork
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.core.stage_profile import EMBEDDING, HEAD, STAGE, PieceTimes, TimingTable
from asyncpp.core.stages import StageSpec
from asyncpp.model.sliding_window import layer_windows
from asyncpp.worker.model_runner import ModelRunner
from asyncpp.worker.process import die_with_parent

REPEATS = 5  # timed runs per piece and step, after one warm-up; the median counts
PIECE_BUDGET_S = 0.25  # fewer runs (at least one) when a piece's step is slower than this share
MAX_PREFILL_TOKENS = 2048
_GREEDY = SampleSpec(SamplingParams(temperature=0), None, 0)


@dataclass(frozen=True, slots=True)
class Piece:
    name: str
    stage: StageSpec  # a stage of three holding just this piece (pp_rank 0: first, 2: last)


@dataclass(frozen=True, slots=True)
class Steps:
    """The two microbatches every piece runs."""
    decode: MicroBatch
    prefill: MicroBatch
    blocks: int  # KV blocks they use

    @classmethod
    def of(cls, config: EngineConfig) -> "Steps":
        """A decode step of COST_SEQS sequences with COST_CONTEXT tokens of context each (the
        cost estimate's), and a prompt's first chunk of a microbatch's token budget."""
        seqs, context = min(COST_SEQS, config.max_num_seqs), min(COST_CONTEXT, config.max_model_len - 1)
        tokens = min(config.max_num_batched_tokens, config.max_model_len, MAX_PREFILL_TOKENS)
        tables = _block_tables([context + 1] * seqs + [tokens], config.block_size)
        ids = [(31 * t + 5) % config.shape.vocab_size for t in range(max(seqs, tokens))]
        decode = [SeqWork(i, [ids[i]], context, tables[i], _GREEDY) for i in range(seqs)]
        prefill = SeqWork(seqs, ids[:tokens], 0, tables[seqs], _GREEDY)
        return cls(MicroBatch(0, decode), MicroBatch(0, [prefill]), sum(map(len, tables)))


def _block_tables(lengths: list[int], block_size: int) -> list[list[int]]:
    """Consecutive blocks for sequences of these lengths, none shared."""
    tables, start = [], 0
    for n in lengths:
        count = -(-n // block_size)
        tables.append(list(range(start, start + count)))
        start += count
    return tables


def layer_kinds(config: EngineConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Each layer's kind of attention half and of MLP half."""
    windows = layer_windows(config.hf_config, config.max_model_len)
    attention = tuple("attention" if w is None else f"attention (window {w})" for w in windows)
    moe = set(config.shape.moe_layers)
    return attention, tuple("moe" if i in moe else "mlp" for i in range(config.shape.num_layers))


def pieces(config: EngineConfig) -> list[Piece]:
    n = config.shape.num_layers
    found = [Piece(STAGE, StageSpec(1, 3, 0, 1, 0, 0)), Piece(EMBEDDING, StageSpec(0, 3, 0, 1, 0, 0)),
             Piece(HEAD, StageSpec(2, 3, 0, 1, n, n))]
    attention, mlp = layer_kinds(config)
    for kinds, alone in ((attention, {"attention_only_last": True}), (mlp, {"mlp_only_first": True})):
        for kind in dict.fromkeys(kinds):
            i = kinds.index(kind)
            found.append(Piece(kind, StageSpec(1, 3, 0, 1, i, i + 1, **alone)))
    return found


def measure(config: EngineConfig, threads: int) -> TimingTable:
    """The timing table of `config`'s model on `threads` torch threads (restored after)."""
    started, previous = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        steps = Steps.of(config)
        raw = {p.name: _time_piece(config, p.stage, steps) for p in pieces(config)}
    finally:
        torch.set_num_threads(previous)
    base = raw[STAGE]
    times = {name: t if name == STAGE else _less(t, base) for name, t in raw.items()}
    attention, mlp = layer_kinds(config)
    device = torch.cuda.get_device_properties(0).total_memory if config.device == "cuda" else 0
    return TimingTable(times, attention, mlp, len(steps.decode.seqs), steps.decode.seqs[0].start_pos,
                       steps.prefill.num_tokens, threads, time.perf_counter() - started, device)


def _less(piece: PieceTimes, base: PieceTimes) -> PieceTimes:
    """A piece's own time: what its stage took less what a bare stage takes."""
    return PieceTimes(max(0.0, piece.decode - base.decode), max(0.0, piece.prefill - base.prefill),
                      piece.weight_bytes)


def _time_piece(config: EngineConfig, stage: StageSpec, steps: Steps) -> PieceTimes:
    runner = ModelRunner(config, stage)
    runner.init_kv_cache(1, steps.blocks)
    decode, prefill = (_median_s(runner, mb) for mb in (steps.decode, steps.prefill))
    return PieceTimes(decode, prefill, runner.param_bytes())


def _median_s(runner: ModelRunner, mb: MicroBatch) -> float:
    """The median of a few timed runs of `mb` on the piece, after a warm-up (caches, the allocator)."""
    sent = _sent(runner, mb)
    cuda = runner.device.type == "cuda"
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    # On one CPU thread the work runs on this thread: its CPU time leaves out the time other
    # processes took the core, which wall time on a shared machine would count.
    clock = time.thread_time if not cuda and torch.get_num_threads() == 1 else time.perf_counter

    def once() -> float:
        inputs = None if sent is None else {k: t.clone() for k, t in sent.items()}  # layers may add in place
        sync()
        start = clock()
        runner.execute(mb, inputs)
        sync()
        return clock() - start

    first = once()
    repeats = max(1, min(REPEATS, int(PIECE_BUDGET_S / max(first, 1e-9))))
    return statistics.median(once() for _ in range(repeats))


def _sent(runner: ModelRunner, mb: MicroBatch) -> IntermediateTensors | None:
    """What the stage before would send: hidden states (and the residual) of the right shape."""
    if runner.stage.is_first:
        return None
    spec = runner.intermediate_spec(mb.num_tokens)
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator).to(runner.device, dtype)
            for name, (shape, dtype) in spec.items()}


# -- in a process of its own (a GPU: no CUDA context, no memory left behind in the engine) ----
def measure_isolated(config: EngineConfig, threads: int, timeout_s: float) -> TimingTable:
    """`measure` in a spawned process; RuntimeError when it fails or takes longer than `timeout_s`.
    The child answers the table as JSON, or why it failed as a string."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_measure_child, args=(config, threads, os.getpid(), send),
                        name="asyncpp-profile")
    child.start()
    send.close()
    try:
        result = receive.recv() if receive.poll(timeout_s) else f"profiling took longer than {timeout_s:.0f} s"
    except EOFError:
        result = "the profiling process died"
    finally:
        child.kill()
        child.join()
        receive.close()
    if isinstance(result, str):
        raise RuntimeError(result)
    return TimingTable.from_json(result)


def _measure_child(config: EngineConfig, threads: int, parent_pid: int, send: Connection) -> None:
    die_with_parent(parent_pid)
    try:
        send.send(measure(config, threads).to_json())
    except Exception as exc:
        send.send(f"{type(exc).__name__}: {exc}")
    finally:
        send.close()
