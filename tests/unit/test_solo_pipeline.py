"""A microbatch alone in a CPU pipeline runs each stage on every core: when that applies (the
config, which microbatches, the rank's thread count) and how the router and scheduler keep a
light load in one such microbatch."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine.router import Router
from asyncpp.engine.scheduler import SOLO_DECODES
from asyncpp.engine.virtual_engine import solo_threads
from asyncpp.executor.mp import SOLO_SPIN_COUNT, _spin_briefly
from asyncpp.worker.worker import StageWorker
from helpers.driver import engine_config

SAMPLE = SampleSpec(SamplingParams(temperature=0), None, 0)


def test_every_core_goes_to_a_lone_stage_of_a_pipeline_of_local_cpu_processes(llama_dir, monkeypatch):
    monkeypatch.setattr("asyncpp.engine_args.available_cores", lambda: 8)
    two = engine_config(llama_dir, pp=2, num_threads=None)
    assert (two.threads_per_rank, two.solo_threads) == (4, 8)
    assert engine_config(llama_dir, pp=2, num_threads=1).solo_threads == 2  # the stages' own cores only
    assert engine_config(llama_dir, pp=2, tensor_parallel_size=2, num_threads=None).solo_threads == 4
    assert engine_config(llama_dir, pp=1, num_threads=None).solo_threads == 0
    assert engine_config(llama_dir, pp=2, num_threads=None, solo_stage_threads=False).solo_threads == 0
    assert engine_config(llama_dir, tensor_parallel_size=2, num_threads=None).solo_threads == 0
    monkeypatch.setattr("asyncpp.engine_args.available_cores", lambda: 2)
    assert engine_config(llama_dir, pp=2, tensor_parallel_size=2, num_threads=None).solo_threads == 0  # 1 a rank


def test_a_microbatch_under_a_light_load_takes_every_core_unless_a_chunk_follows_it_at_once():
    decode = SeqWork(0, [5], 10, [0], SAMPLE)
    last_chunk = SeqWork(1, [5] * 8, 0, [1], SAMPLE)
    middle_chunk = SeqWork(2, [5] * 8, 0, [2], None)
    assert solo_threads(MicroBatch(0, [decode, last_chunk]), 4, SOLO_DECODES) == 4
    assert solo_threads(MicroBatch(0, [decode, middle_chunk]), 4, 2) == 0
    assert solo_threads(MicroBatch(0, [decode]), 4, SOLO_DECODES + 1) == 0  # other VEs' work would overlap it
    assert solo_threads(MicroBatch(0, [decode]), 0, 1) == 0


def test_a_rank_runs_a_microbatch_with_its_threads_then_returns_to_its_own():
    before = torch.get_num_threads()
    worker = StageWorker.__new__(StageWorker)  # no process, link or model: the thread switch alone
    worker.threads = worker._threads_now = 1
    try:
        torch.set_num_threads(1)
        worker._use_threads(2)
        assert torch.get_num_threads() == 2
        worker._use_threads(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_spawned_ranks_spin_briefly_unless_the_user_chose(llama_dir, monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    config = engine_config(llama_dir, pp=2)
    with _spin_briefly(config):
        assert os.environ["GOMP_SPINCOUNT"] == SOLO_SPIN_COUNT
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with _spin_briefly(config):
        assert "GOMP_SPINCOUNT" not in os.environ


@dataclass
class FakeVE:
    ve_id: int
    num_unfinished_seqs: int = 0


def test_a_light_load_is_packed_into_one_virtual_engine_and_a_heavy_one_spread(llama_dir, monkeypatch):
    monkeypatch.setattr("asyncpp.engine_args.available_cores", lambda: 2)
    config = engine_config(llama_dir, pp=2, num_virtual_engines=2, enable_prefix_caching=False)
    assert config.solo_threads
    router = Router(config)
    router.ves = [FakeVE(0), FakeVE(1)]
    placed = []
    for i in range(SOLO_DECODES + 4):
        ve = router.route(f"r{i}", None)
        ve.num_unfinished_seqs += 1
        placed.append(ve.ve_id)
    assert placed[:SOLO_DECODES] == [0] * SOLO_DECODES  # together: one microbatch, every core per stage
    assert placed[SOLO_DECODES:] == [1, 1, 1, 1]  # then to the least loaded
