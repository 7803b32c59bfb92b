"""The shared-memory ring alone in one process: a side that waits on a missing peer times
out, naming the peer. (Across processes and in the engine: integration/test_stage_link.py.)"""
from __future__ import annotations

import pytest
import torch

from asyncpp.worker.shm_channel import RingRegion, ShmReceiver, ShmSender
from asyncpp.worker.shm_common import unlink_quietly

NUM_SLOTS = 3
SLOT_BYTES = 1000


def test_receiver_without_sender_times_out_clearly():
    region = RingRegion.create(NUM_SLOTS, SLOT_BYTES)
    unlink_quietly(region.path)
    receiver = ShmReceiver(region, "stage rank 0 (sender)", timeout_s=0.05)
    with pytest.raises(TimeoutError, match=r"stage rank 0 \(sender\) sent nothing for piece 0 within"):
        receiver.recv_into([torch.empty(4)])
    receiver.close()


def test_full_ring_sender_times_out_clearly():
    region = RingRegion.create(NUM_SLOTS, SLOT_BYTES)
    unlink_quietly(region.path)
    sender = ShmSender(region, "stage rank 1 (receiver)", timeout_s=0.05)
    for _ in range(NUM_SLOTS):
        sender.send([torch.zeros(4)])  # fills the ring; nobody reads
    with pytest.raises(TimeoutError, match=r"stage rank 1 \(receiver\) did not free a slot"):
        sender.send([torch.zeros(4)])
    sender.close()
