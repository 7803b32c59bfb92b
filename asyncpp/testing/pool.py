"""The session's engines and servers: one of each per distinct settings, started when a test
first asks for it, all stopped when the session ends."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from asyncpp.engine_args import EngineArgs
from asyncpp.testing.engine_thread import EngineThread
from asyncpp.testing.live_server import LiveServer, live_server
from asyncpp.testing.settings import TINY, EngineSettings
from asyncpp.testing.tiny_model import make_tiny_model


class Pool:
    def __init__(self, tiny_dir: Path):
        """`tiny_dir`: an empty folder where the tiny model is built if a test asks for it."""
        self._tiny_dir = Path(tiny_dir)
        self._tiny_built = False
        self._engines: dict[str, EngineThread] = {}
        self._servers: dict[str, LiveServer] = {}
        self._stack = ExitStack()

    def tiny_model(self) -> Path:
        if not self._tiny_built:
            make_tiny_model(self._tiny_dir)
            self._tiny_built = True
        return self._tiny_dir

    def engine_args(self, settings: EngineSettings) -> EngineArgs:
        return settings.engine_args(str(self.tiny_model()) if settings.model == TINY else None)

    def engine(self, settings: EngineSettings) -> EngineThread:
        if settings.key not in self._engines:
            engine = EngineThread(self.engine_args(settings))
            self._stack.callback(engine.close)
            self._engines[settings.key] = engine
        return self._engines[settings.key]

    def server(self, settings: EngineSettings) -> LiveServer:
        if settings.key not in self._servers:
            self._servers[settings.key] = self._stack.enter_context(live_server(self.engine_args(settings)))
        return self._servers[settings.key]

    def close(self) -> None:
        """Stops every server and engine, the newest first."""
        self._engines.clear()
        self._servers.clear()
        self._stack.close()
