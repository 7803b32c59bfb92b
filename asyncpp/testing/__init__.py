"""Testing apps against a real asyncpp engine: the pytest plugin (plugin.py, registered as
the `pytest11` entry point `asyncpp`) and the tiny random model it can build."""
from asyncpp.testing.engine_view import EngineView, RemoteStream
from asyncpp.testing.settings import BUNDLED, TINY
from asyncpp.testing.tiny_model import make_tiny_model

__all__ = ["BUNDLED", "EngineView", "RemoteStream", "TINY", "make_tiny_model"]
