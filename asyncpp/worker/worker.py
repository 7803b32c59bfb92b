"""The stage process: join the world, build this rank's layers, then run microbatches.

Messages from the engine (pickled tuples on the control pipe):
    ("run", MicroBatch) | ("init_kv", num_virtual_engines, blocks_per_ve) | ("stop",)
Messages to the engine (on the result pipe):
    ("ready", rank, param_bytes, num_available_blocks) | ("ok", rank)
    ("result", mb_id, StepOutput)   -- last stage, tp_rank 0 only
    ("error", rank, monotonic_time, summary, traceback_text)
"""
from __future__ import annotations

import ctypes
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

import torch

from asyncpp.config import EngineConfig
from asyncpp.core.stages import StageSpec
from asyncpp.core.microbatch import MicroBatch, StepOutput
from asyncpp.worker.comm import TPGroup, close_world, connect_stage_links, init_world, make_tp_groups

STOP = ("stop",)
_PR_SET_PDEATHSIG = 1

RunnerFactory = Callable[[EngineConfig, StageSpec, TPGroup], Any]


def default_runner_factory(config: EngineConfig, stage: StageSpec, tp_group: TPGroup) -> Any:
    from asyncpp.worker.model_runner import ModelRunner
    return ModelRunner(config, stage, tp_group=tp_group)


@dataclass(slots=True)
class WorkerArgs:
    config: EngineConfig
    rank: int
    init_method: str
    parent_pid: int
    runner_factory: RunnerFactory = default_runner_factory


class StageWorker:
    """One rank: its place in the world, its links, its model. `serve` is the loop for the
    pipe transport (`mp`); Ray actors call `run` and `init_kv_cache` directly."""

    def __init__(self, args: WorkerArgs, busy: Any, send: Callable[[bytes], None] | None = None):
        self.config, self.rank = args.config, args.rank
        self.stage = args.config.stage(args.rank)
        self.busy, self.send = busy, send
        device = init_world(args.rank, len(args.config.stages), args.init_method, args.config.device)
        self.sync_cuda = device.type == "cuda"
        tp_group = make_tp_groups(self.stage.pp_size, self.stage.tp_size, args.rank)
        self.runner = args.runner_factory(args.config, self.stage, tp_group)
        self.link = connect_stage_links(self.stage, device, self._message_bytes(),
                                        num_slots=args.config.num_virtual_engines + 1)
        self.reports_results = self.stage.is_last and self.stage.tp_rank == 0

    def _message_bytes(self) -> int:
        """One microbatch's intermediate tensors at the most tokens a microbatch holds."""
        spec = self.runner.intermediate_spec(self.config.max_num_batched_tokens)
        return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in spec.values())

    def reply(self, msg: tuple) -> None:
        assert self.send is not None
        self.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def serve(self, inbox: "queue.SimpleQueue[tuple]") -> None:
        self.reply(("ready", self.rank, self.runner.param_bytes(), self.runner.num_available_blocks()))
        while (msg := inbox.get())[0] != "stop":
            if msg[0] == "run":
                out = self.run(msg[1])
                if out is not None:
                    self.reply(("result", msg[1].mb_id, out))
            elif msg[0] == "init_kv":
                self.init_kv_cache(msg[1], msg[2])
                self.reply(("ok", self.rank))
            else:
                raise ValueError(f"unknown control message {msg[0]!r}")
        self.link.close()

    def init_kv_cache(self, num_virtual_engines: int, blocks_per_ve: int) -> None:
        self.runner.init_kv_cache(num_virtual_engines, blocks_per_ve)

    def run(self, mb: MicroBatch) -> StepOutput | None:
        """Run one microbatch; the sampled tokens on the rank that reports them, else None."""
        intermediate = None
        if not self.stage.is_first:
            intermediate = self.link.recv(self.runner.intermediate_spec(mb.num_tokens))
        started = time.perf_counter()
        out = self.runner.execute(mb, intermediate)
        if self.sync_cuda:
            torch.cuda.current_stream().synchronize()
        self.busy[self.rank] += time.perf_counter() - started  # compute only, not waits
        if not self.stage.is_last:
            self.link.send(out)
            return None
        return out if self.reports_results else None


def die_with_parent(parent_pid: int) -> None:
    """The kernel kills us when the thread that spawned us exits (Linux only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _read_control(conn: Connection, inbox: "queue.SimpleQueue[tuple]") -> None:
    """Drain the control pipe at once, so the engine never blocks on a full pipe."""
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            msg = STOP  # the engine closed the pipe or died
        inbox.put(msg)
        if msg[0] == "stop":
            return


def run_stage(args: WorkerArgs, control: Connection, results: Connection, busy: Any) -> None:
    """Process entry point for the `mp` backend."""
    die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine handles Ctrl-C and stops us
    torch.set_num_threads(args.config.threads_per_rank)
    inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
    threading.Thread(target=_read_control, args=(control, inbox), daemon=True,
                     name="asyncpp-control").start()
    try:
        StageWorker(args, busy, results.send_bytes).serve(inbox)
        close_world()
    except BaseException as exc:
        report_failure(args.rank, exc, results.send_bytes)
        os._exit(1)  # skip interpreter teardown: peers may hold our collectives forever


def failure_report(rank: int, exc: BaseException) -> tuple:
    """("error", rank, monotonic time, summary, traceback): what the engine blames ranks by."""
    summary = "".join(traceback.format_exception_only(exc)).strip()
    return ("error", rank, time.monotonic(), summary, "".join(traceback.format_exception(exc)))


def report_failure(rank: int, exc: BaseException, send: Callable[[bytes], None]) -> None:
    """Tell the engine why we stop; stderr only when the engine cannot hear it."""
    msg = failure_report(rank, exc)
    try:
        send(pickle.dumps(msg))
    except OSError:
        print(f"asyncpp rank {rank} failed:\n{msg[4]}", file=sys.stderr, flush=True)
