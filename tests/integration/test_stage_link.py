"""Stage-to-stage transport: the shared-memory ring between two processes (exact bytes,
wrap-around, messages larger than a slot), and engine parity on each transport (shm
insisted on, gloo forced). The ring's timeouts: unit/test_shm_ring.py."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from helpers.parity import engine_tokens, hf_greedy, mixed_prompts

NUM_SLOTS = 3
SLOT_BYTES = 1000  # rounded up to 1024: some messages below take several slots
NUM_MESSAGES = 11  # more than the slots: the ring wraps around several times


def message(i: int) -> list[torch.Tensor]:
    """Message i: tensors of several names' shapes and dtypes, with every bit pattern
    random (NaN payloads included), so only an exact byte copy passes."""
    g = torch.Generator().manual_seed(i)
    shapes = [((1 + i % 4, 8), torch.float32), ((37 * i + 1,), torch.int64),
              ((2, 5 + i), torch.bfloat16), ((i % 3,), torch.float16)]  # i % 3 == 0: an empty tensor
    out = []
    for shape, dtype in shapes:
        n = torch.Size(shape).numel() * dtype.itemsize
        raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        out.append(raw.view(dtype).view(shape))
    return out


def _send_all(path: str) -> None:
    from asyncpp.worker.shm_channel import RingRegion, ShmSender

    sender = ShmSender(RingRegion.attach(path, NUM_SLOTS, SLOT_BYTES), "test receiver", timeout_s=60)
    for i in range(NUM_MESSAGES):
        sender.send(message(i))
    sender.close()


def test_ring_carries_exact_bytes_across_processes():
    from asyncpp.worker.shm_channel import RingRegion, ShmReceiver
    from asyncpp.worker.shm_common import unlink_quietly

    region = RingRegion.create(NUM_SLOTS, SLOT_BYTES)
    child = mp.get_context("spawn").Process(target=_send_all, args=(region.path,))
    child.start()
    receiver = ShmReceiver(region, "test sender", timeout_s=60)
    try:
        for i in range(NUM_MESSAGES):
            expected = message(i)
            got = [torch.empty_like(t) for t in expected]
            receiver.recv_into(got)
            for g, e in zip(got, expected):
                assert g.view(torch.uint8).tolist() == e.view(torch.uint8).tolist(), f"message {i}"
    finally:
        child.join(timeout=60)
        unlink_quietly(region.path)
        receiver.close()
    assert child.exitcode == 0


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_pipeline_parity_on_each_transport(llama_dir, transport):
    """shm: insisted on, so the engine fails at start unless every link uses it (P = 3: a
    middle stage has both ends). gloo: the fallback for other machines stays covered."""
    prompts = mixed_prompts(6, hi=120, seed=31)
    tokens, _ = engine_tokens(llama_dir, prompts, 8, pipeline_parallel_size=3, num_virtual_engines=3,
                              max_num_batched_tokens=128, pp_comm=transport)
    assert tokens == hf_greedy(llama_dir, prompts, 8)
