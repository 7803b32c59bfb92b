"""The stage process of the `mp` transport: typed messages over two pipes.

The control pipe (engine -> rank) is drained at once by a thread into a queue, so the
engine never blocks on a full pipe; replies go back on the results pipe.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection

import torch

from asyncpp.core.messages import Failure, FromRank, Stop, ToRank
from asyncpp.worker.worker import WorkerArgs, serve

_PR_SET_PDEATHSIG = 1


def run_stage(args: WorkerArgs, parent_pid: int, control: Connection, results: Connection) -> None:
    """Process entry point."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine handles Ctrl-C and stops us
    torch.set_num_threads(args.config.threads_per_rank)
    inbox: queue.SimpleQueue[ToRank] = queue.SimpleQueue()
    threading.Thread(target=_read_control, args=(control, inbox), daemon=True,
                     name="asyncpp-control").start()

    def send(msg: FromRank) -> None:
        results.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        serve(args, inbox.get, send)
    except BaseException as exc:
        _report(args.rank, exc, send)
        os._exit(1)  # skip interpreter teardown: peers may hold our collectives forever


def die_with_parent(parent_pid: int) -> None:
    """The kernel kills us when the thread that spawned us exits (Linux only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _read_control(conn: Connection, inbox: "queue.SimpleQueue[ToRank]") -> None:
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            msg = Stop()  # the engine closed the pipe or died
        inbox.put(msg)
        if isinstance(msg, Stop):
            return


def _report(rank: int, exc: BaseException, send) -> None:
    """Tell the engine why we stop; stderr only when the engine cannot hear it."""
    failure = Failure.of(rank, exc)
    try:
        send(failure)
    except OSError:
        print(f"asyncpp rank {rank} failed:\n{failure.text}", file=sys.stderr, flush=True)
