"""A CPU stage's KV pool is resident from the start (its memory known up front, no growth
under load) and advised into transparent huge pages where the kernel allows them."""
from __future__ import annotations

from pathlib import Path

import torch

from asyncpp.core.microbatch import MicroBatch, SeqWork
from asyncpp.worker.model_runner import ModelRunner
from helpers.driver import engine_config
from helpers.parity import mixed_prompts

BLOCKS = 4096  # the tiny Llama keeps 1 KiB of KV a token: 64 MiB in blocks of 16
PROMPT = 512
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def rss() -> int:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


def mapping_of(address: int) -> list[str]:
    """The lines /proc/self/smaps gives the mapping that holds `address`."""
    lines, found = Path("/proc/self/smaps").read_text().splitlines(), []
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(x, 16) for x in head.split("-"))
            if found:
                break
            if start <= address < end:
                found = [line]
        elif found:
            found.append(line)
    return found


def test_kv_pool_is_resident_at_start_and_a_load_writing_every_block_adds_nothing(llama_dir):
    torch.set_num_threads(1)
    config = engine_config(llama_dir, max_model_len=PROMPT + 1)
    runner = ModelRunner(config, config.stages[0])
    before = rss()
    runner.init_kv_cache(1, BLOCKS)
    keys, values = runner.kv_caches[0][0]
    pool = keys.untyped_storage().nbytes() + values.untyped_storage().nbytes()
    assert pool == BLOCKS * config.block_size * 1024
    resident = rss()
    assert resident - before >= 0.95 * pool  # all of it, now
    per_prompt = PROMPT // config.block_size
    prompt = mixed_prompts(1, PROMPT, PROMPT)[0]
    for first in range(0, BLOCKS, per_prompt):  # every block written once, as a filling load does
        work = SeqWork(first, prompt, 0, list(range(first, first + per_prompt)), None)
        runner.forward(MicroBatch(0, [work]), None)
    assert rss() - resident < pool / 4
    if THP.exists() and "[never]" not in THP.read_text():  # advised ("hg"), so eligible for huge pages
        fields = dict(line.split(":", 1) for line in mapping_of(keys.data_ptr())[1:])
        assert "hg" in fields["VmFlags"].split() and fields["THPeligible"].strip() == "1", fields
