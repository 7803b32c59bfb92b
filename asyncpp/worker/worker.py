"""One rank: join the world, build this rank's layers, answer the engine's messages.

Every transport drives the same `StageWorker.handle` and gets the same replies: a loop
over a pipe (`mp`, asyncpp.worker.process), a loop over a queue in a thread (`uni`), or
one Ray actor call per message (`ray`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from asyncpp.core.config import EngineConfig
from asyncpp.core.messages import (
    Failure,
    FromRank,
    InitKv,
    KvReady,
    LinkTimes,
    Ready,
    Reshape,
    Reshaped,
    Result,
    Run,
    Stop,
    ToRank,
)
from asyncpp.core.microbatch import IntermediateTensors, MicroBatch, StepOutput, TensorSpec
from asyncpp.core.placement import Node, RankPlacement
from asyncpp.core.stages import StageSpec
from asyncpp.model.parallel import TPGroup
from asyncpp.worker.model_runner import ModelRunner
from asyncpp.worker.stage_link import connect_stage_links
from asyncpp.worker.tp_comm import make_tp_communicator
from asyncpp.worker.world import close_world, init_world, local_device

# A device error leaves the device's state unknown: the rank must die, not carry on.
_DEVICE_ERRORS: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "AcceleratorError", None),) if t is not None)


class Runner(Protocol):
    """What a rank runs: ModelRunner, or a stand-in in tests."""

    def param_bytes(self) -> int: ...
    def num_available_blocks(self) -> int: ...
    def init_kv_cache(self, num_virtual_engines: int, blocks_per_ve: int) -> None: ...
    def intermediate_spec(self, num_tokens: int) -> TensorSpec: ...
    def execute(self, mb: MicroBatch, intermediate: IntermediateTensors | None
                ) -> IntermediateTensors | StepOutput: ...


RunnerFactory = Callable[[EngineConfig, StageSpec, TPGroup], Runner]


def default_runner_factory(config: EngineConfig, stage: StageSpec, tp_group: TPGroup) -> Runner:
    return ModelRunner(config, stage, tp_group=tp_group)


@dataclass(slots=True)
class WorkerArgs:
    config: EngineConfig
    rank: int
    init_method: str  # where the world meets; unused when the world is one rank
    runner_factory: RunnerFactory = default_runner_factory
    node: Node | None = None  # this rank's machine (None: this host, outside Ray)
    interface: str = ""  # the network interface its collectives are bound to, if set


class StageWorker:
    def __init__(self, args: WorkerArgs):
        config, self.rank = args.config, args.rank
        self.node, self.interface = args.node or Node.local(), args.interface
        self.stage = config.stage(args.rank)
        self.distributed = config.world_size > 1
        if self.distributed:
            device = init_world(args.rank, config.world_size, args.init_method, config.device)
        else:
            device = local_device(config.device)
        self.device = device
        self.sync_cuda = device.type == "cuda"
        self.threads = self._threads_now = config.threads_per_rank
        self.tp = make_tp_communicator(self.stage.pp_size, self.stage.tp_size, args.rank, config.tp_comm)
        self.runner_factory = args.runner_factory
        self.runner = args.runner_factory(config, self.stage, self.tp)
        self.link = connect_stage_links(self.stage, device, self._message_bytes(config),
                                        num_slots=config.max_in_flight_total + 1, choice=config.pp_comm,
                                        node=self.node.node_id)
        self.samples = self.stage.is_last and self.stage.tp_rank == 0
        self.busy_s = 0.0

    def _message_bytes(self, config: EngineConfig) -> int:
        """One microbatch's intermediate tensors at the most tokens a microbatch holds."""
        spec = self.runner.intermediate_spec(config.max_num_batched_tokens)
        return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in spec.values())

    def ready(self) -> Ready:
        where = RankPlacement(self.rank, self.stage.pp_rank, self.stage.tp_rank, self.node, self.link.kind_in,
                              self.interface)
        return Ready(self.rank, self.runner.param_bytes(), self.runner.num_available_blocks(), where)

    def handle(self, msg: ToRank) -> FromRank:
        match msg:
            case Run(mb):
                output, error, link = self.run(mb)
                return Result(self.rank, mb.mb_id, output, self.busy_s, error, link)
            case InitKv(num_virtual_engines, blocks_per_ve):
                self.runner.init_kv_cache(num_virtual_engines, blocks_per_ve)
                return KvReady(self.rank)
            case Reshape(config, blocks_per_ve):
                return self.reshape(config, blocks_per_ve)
        raise ValueError(f"unexpected message {msg!r}")

    def reshape(self, config: EngineConfig, blocks_per_ve: int) -> Reshaped:
        """Serve `config`'s split. Only this rank's own layers are built, in this process: no
        new process, world or stage link, so a move costs the load of one stage's weights.
        The old KV cache goes before the new one is made (the engine re-prefills every running
        sequence after a move, whatever its outcome), the old weights only once the new ones
        are loaded, so a failed build leaves this rank serving its old layers."""
        stage = config.stage(self.rank)
        if stage == self.stage:
            return Reshaped(self.rank, self.runner.param_bytes())
        try:
            runner = self.runner_factory(config, stage, self.tp)
            self.runner.init_kv_cache(0, 0)
            needed, held = config.num_virtual_engines * blocks_per_ve, runner.num_available_blocks()
            if held < needed:
                raise RuntimeError(f"stage {stage.pp_rank} of the split {config.layer_partition} holds {held} KV "
                                   f"blocks, fewer than the {needed} the engine runs with")
            runner.init_kv_cache(config.num_virtual_engines, blocks_per_ve)
        except _DEVICE_ERRORS:
            raise
        except Exception as exc:
            self.runner.init_kv_cache(config.num_virtual_engines, blocks_per_ve)
            return Reshaped(self.rank, self.runner.param_bytes(), error=Failure.of(self.rank, exc).summary)
        self.runner, self.stage = runner, stage
        return Reshaped(self.rank, runner.param_bytes(), rebuilt=True)

    def run(self, mb: MicroBatch) -> tuple[StepOutput | None, Failure | None, LinkTimes | None]:
        """Run one microbatch: (the sampled tokens on the rank that reports them, else None;
        the microbatch's own failure, if it raised here; when its stage link was used).

        An exception from this microbatch's forward or sampling fails the microbatch, not
        the rank: it came from the microbatch's inputs, and the weights and the other
        sequences' KV are untouched. The next stage still gets tensors of the right shape,
        so every stage stays in step. Link and device errors are not caught: after them
        the pipeline's state cannot be trusted, and the rank dies."""
        self._use_threads(mb.threads)
        intermediate = None
        recv_start = recv_done = 0.0
        if not self.stage.is_first:
            recv_start = time.time()
            intermediate = self.link.recv(self.runner.intermediate_spec(mb.num_tokens))
            recv_done = time.time()
        started = time.perf_counter()
        error = None
        try:
            out = self.runner.execute(mb, intermediate)
        except _DEVICE_ERRORS:
            raise
        except Exception as exc:
            error = Failure.of(self.rank, exc)
            out = None if self.stage.is_last else self._placeholder(mb.num_tokens)
        if self.sync_cuda:
            torch.cuda.current_stream().synchronize()
        self.busy_s += time.perf_counter() - started  # compute only, not waits
        if not self.stage.is_last:
            send_start = time.time()
            self.link.send(out)
            return None, error, LinkTimes(recv_start, recv_done, send_start)
        link = LinkTimes(recv_start, recv_done) if self.distributed else None
        return (out if self.samples else None), error, link

    def _use_threads(self, threads: int) -> None:
        """A microbatch alone in the pipeline brings its own thread count (the other stages'
        cores are idle meanwhile); the next one without it goes back to the rank's own."""
        wanted = threads or self.threads
        if wanted != self._threads_now:
            torch.set_num_threads(wanted)
            self._threads_now = wanted

    def _placeholder(self, num_tokens: int) -> IntermediateTensors:
        spec = self.runner.intermediate_spec(num_tokens)
        return {name: torch.zeros(shape, dtype=dtype, device=self.device) for name, (shape, dtype) in spec.items()}

    def close(self) -> None:
        self.link.close()
        if self.distributed:
            close_world()


def serve(args: WorkerArgs, recv: Callable[[], ToRank], send: Callable[[FromRank], None]) -> None:
    """A rank's whole life under a message loop: build, say Ready, answer until Stop.
    Exceptions propagate: the caller reports them as a Failure and ends the rank."""
    worker = StageWorker(args)
    send(worker.ready())
    while not isinstance(msg := recv(), Stop):
        send(worker.handle(msg))
    worker.close()
