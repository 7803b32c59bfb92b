"""asyncpp's pytest plugin (registered as the `pytest11` entry point `asyncpp`; disable with
`-p no:asyncpp`). Fixtures:

- `asyncpp_engine`: the request side of an AsyncLLM (add_request, generate, abort, stats, ...),
  awaitable under asyncio and trio alike;
- `asyncpp_server`: the base URL of `asyncpp serve`'s app on a free loopback port;
- `asyncpp_client`: an `asyncpp.Client` connected to it (an async fixture: anyio tests only);
- `asyncpp_engine_args`: the EngineArgs, for a test that starts its own AsyncLLM or app;
- `asyncpp_tiny_model`: the folder of the tiny random model, built once per session.

Which engine: the `asyncpp` marker, `--asyncpp-*` options, `asyncpp_*` ini settings
(settings.py). Engines live for the session, one per distinct setting, each on its own
thread (an engine belongs to one event loop, and tests run theirs per test and per anyio
backend); servers likewise, in uvicorn's thread. After each test the fixtures abort what
it left running and wait until the engine holds no request, so the next test starts on an
idle engine. At the end of the session every engine, stage process, thread and
shared-memory file is gone. A test marked `gpu` is skipped without CUDA, as is one whose
device setting is cuda.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from asyncpp.client import Client
from asyncpp.engine_args import EngineArgs
from asyncpp.testing.engine_view import EngineView
from asyncpp.testing.pool import Pool
from asyncpp.testing.settings import OPTIONS, EngineSettings, resolve

MARKER_HELP = ("asyncpp(**engine_args): the engine the asyncpp fixtures give this test: EngineArgs keywords, "
               "model='bundled' | 'tiny' | a folder")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("asyncpp", "asyncpp engine fixtures (a test's `asyncpp` marker overrides these)")
    for option in OPTIONS:
        parser.addini(option.ini, f"asyncpp fixtures: {option.help} (default {option.default})", default="")
        group.addoption(option.flag, dest=option.ini, default=None,
                        help=f"{option.help} (ini: {option.ini}; default {option.default})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs CUDA, which this machine lacks")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def configured(config: pytest.Config) -> dict[str, str | None]:
    """Each option's command-line value, else its ini value."""
    return {option.name: config.getoption(option.ini) or config.getini(option.ini) or None for option in OPTIONS}


@pytest.fixture(scope="session")
def _asyncpp_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    pool = Pool(tmp_path_factory.mktemp("asyncpp-tiny-model"))
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def asyncpp_tiny_model(_asyncpp_pool: Pool) -> Path:
    return _asyncpp_pool.tiny_model()


@pytest.fixture
def asyncpp_settings(request: pytest.FixtureRequest) -> EngineSettings:
    markers = [marker.kwargs for marker in request.node.iter_markers("asyncpp")]
    settings = resolve(configured(request.config), markers)
    if settings.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("the asyncpp device setting is cuda, which this machine lacks")
    return settings


@pytest.fixture
def asyncpp_engine_args(asyncpp_settings: EngineSettings, _asyncpp_pool: Pool) -> EngineArgs:
    return _asyncpp_pool.engine_args(asyncpp_settings)


@pytest.fixture
def asyncpp_engine(asyncpp_settings: EngineSettings, _asyncpp_pool: Pool) -> Iterator[EngineView]:
    view = EngineView(_asyncpp_pool.engine(asyncpp_settings))
    yield view
    view.release()


@pytest.fixture
def asyncpp_server(asyncpp_settings: EngineSettings, _asyncpp_pool: Pool) -> Iterator[str]:
    server = _asyncpp_pool.server(asyncpp_settings)
    yield server.url
    server.wait_idle()


@pytest.fixture
async def asyncpp_client(asyncpp_server: str) -> AsyncIterator[Client]:
    async with Client(asyncpp_server) as client:
        yield client
