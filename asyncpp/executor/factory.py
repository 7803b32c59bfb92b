"""The executor for a config: the pipeline driver over the configured backend's transport."""
from __future__ import annotations

from asyncpp.core.config import EngineConfig
from asyncpp.executor.executor import Executor
from asyncpp.executor.mp import MultiprocTransport
from asyncpp.executor.ray import RayTransport
from asyncpp.executor.transport import Transport
from asyncpp.executor.uni import ThreadTransport
from asyncpp.worker.worker import RunnerFactory, default_runner_factory

TRANSPORTS: dict[str, type[Transport]] = {"uni": ThreadTransport, "mp": MultiprocTransport, "ray": RayTransport}


def create_executor(config: EngineConfig, runner_factory: RunnerFactory = default_runner_factory) -> Executor:
    if config.backend not in TRANSPORTS:
        raise ValueError(f"unknown distributed_executor_backend {config.backend!r}")
    return Executor(config, TRANSPORTS[config.backend](config, runner_factory))
