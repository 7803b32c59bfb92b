"""asyncpp's pytest plugin, run the way a user's project runs it: inner pytest sessions
(pytester) with their own test files, ini settings and options. Those that start engines run
in a fresh interpreter (pytester's in-process runs unload modules between sessions, which
torch does not survive) and report what outlived their fixtures: no thread, stage process
or shared-memory file may."""
from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
import torch

pytest_plugins = ["pytester"]

LEAK_REPORT = """
import json
import multiprocessing
import os
import threading
from pathlib import Path

from asyncpp.worker.shm_common import shm_dir

# Threads kept for the process by design: anyio's and trio's idle workers, and the monitor
# tqdm starts with its first bar (transformers' save_pretrained draws one).
POOLED_THREADS = ("AnyIO worker thread", "Trio thread", "tqdm_monitor")


def _shm_files():
    return {p.name for p in Path(shm_dir()).glob("asyncpp-*")}


def _ours(name):
    # Other people's engines may be running on this machine: only files of ours count.
    pid = name.split("-")[2]
    return not pid.isdigit() or int(pid) == os.getpid() or not Path(f"/proc/{pid}").exists()


def pytest_configure(config):
    config.shm_before = _shm_files()


def pytest_unconfigure(config):  # every fixture, session-scoped ones too, is torn down by now
    threads = [t.name for t in threading.enumerate()
               if t is not threading.main_thread() and not t.name.startswith(POOLED_THREADS)]
    report = {"threads": threads, "children": [p.pid for p in multiprocessing.active_children()],
              "shm": sorted(n for n in _shm_files() - config.shm_before if _ours(n))}
    Path("leaks.json").write_text(json.dumps(report))
"""

SHARED_ACROSS_BACKENDS = """
import pytest
from asyncpp import SamplingParams

SEEN = {"servers": set(), "tokens_before": []}
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.mark.anyio
async def test_engine(asyncpp_engine, asyncpp_server):
    SEEN["tokens_before"].append(asyncpp_engine.stats().generation_tokens_total)
    SEEN["servers"].add(asyncpp_server)
    outputs = [out async for out in asyncpp_engine.generate("San Francisco is a", GREEDY)]
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 8


@pytest.mark.anyio
async def test_client(asyncpp_client, asyncpp_server):
    SEEN["servers"].add(asyncpp_server)
    assert await asyncpp_client.health()
    assert await asyncpp_client.generate("San Francisco is a", max_tokens=4)


def test_one_engine_and_one_server_served_both_backends():
    assert len(SEEN["servers"]) == 1
    assert SEEN["tokens_before"] == [0, 8]  # the trio test found the asyncio test's tokens
"""

MARKERS_AND_LAYOUT = """
import multiprocessing

import pytest
from asyncpp import SamplingParams

pytestmark = pytest.mark.asyncpp(max_model_len=256, pipeline_parallel_size=2)


@pytest.mark.asyncpp(pp_layer_partition="3,1")
def test_module_and_test_markers_combine(asyncpp_engine):
    assert asyncpp_engine.config.layer_partition == [3, 1]
    assert asyncpp_engine.config.max_model_len == 256
    assert len(asyncpp_engine.stats().pipeline.stage_busy_s) == 2
    assert len(multiprocessing.active_children()) >= 2  # the stage processes


@pytest.mark.asyncpp(max_model_len=128)
@pytest.mark.anyio
async def test_the_closest_marker_wins(asyncpp_engine):
    assert asyncpp_engine.config.max_model_len == 128
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outputs = [out async for out in asyncpp_engine.generate({"prompt_token_ids": [5, 6, 7]}, params)]
    assert outputs[-1].outputs[0].token_ids and asyncpp_engine.stats().pipeline.microbatches > 0
"""

SKIPS_AND_ERRORS = """
import pytest


def test_engine_on_cuda(asyncpp_engine):
    pass


@pytest.mark.gpu
def test_marked_gpu():
    pass


def test_plain():
    pass


@pytest.mark.asyncpp(pipelines=2)
def test_unknown_keyword(asyncpp_engine_args):
    pass
"""


def run_engines(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """An inner session in a fresh interpreter; fails if it left anything behind."""
    pytester.makeconftest(LEAK_REPORT)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    leaks = json.loads((pytester.path / "leaks.json").read_text())
    assert leaks == {"threads": [], "children": [], "shm": []}
    return result


def test_the_plugin_is_an_entry_point(request):
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins["asyncpp"] == "asyncpp.testing.plugin"
    assert request.config.pluginmanager.has_plugin("asyncpp")


def test_tiny_model_shared_by_both_backends(pytester):
    pytester.makeini("[pytest]\nasyncpp_model = tiny\n")
    pytester.makepyfile(test_shared=SHARED_ACROSS_BACKENDS)
    run_engines(pytester).assert_outcomes(passed=5)


def test_markers_choose_the_layout(pytester, asyncpp_tiny_model):
    pytester.makepyfile(test_layout=MARKERS_AND_LAYOUT)
    result = run_engines(pytester, "--asyncpp-model", str(asyncpp_tiny_model))
    result.assert_outcomes(passed=3)  # anyio runs the async test under each backend it finds


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skips under test happen without CUDA")
def test_cuda_skips_cleanly_and_bad_keywords_are_named(pytester):
    pytester.makepyfile(test_skips=SKIPS_AND_ERRORS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs", "--asyncpp-device", "cuda")
    result.assert_outcomes(passed=1, skipped=2, errors=1)
    result.stdout.fnmatch_lines(["*unknown keyword(s) ?'pipelines'?*",
                                 "SKIPPED * test_skips.py:*: the asyncpp device setting is cuda*",
                                 "SKIPPED * test_skips.py:*: marked gpu: needs CUDA*"])


def test_help_names_the_options(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--asyncpp-model=*", "*--asyncpp-pipeline-parallel-size=*",
                                 "*--asyncpp-device=*", "*asyncpp_model (string)*"])
