"""Joining and leaving the torch.distributed world of one engine's P*T ranks
(rank = pp_rank * T + tp_rank): gloo on CPU, NCCL on GPUs."""
from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_init_method() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def init_world(rank: int, world_size: int, init_method: str, device: str,
               timeout_s: float = 600.0) -> torch.device:
    """Join the world; returns the device this rank computes on."""
    if device == "cuda":
        local = rank % torch.cuda.device_count()
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), device_id=dev)
        return dev
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return torch.device("cpu")


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str) -> torch.device:
    """The device of a one-rank world, which joins no process group."""
    if device == "cuda":
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")
