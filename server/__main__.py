"""`python -m asyncpp.server`: the same as `asyncpp serve`."""
import argparse

from asyncpp.server.cli import add_serve_args, run_serve

parser = argparse.ArgumentParser(prog="python -m asyncpp.server", description="asyncpp's OpenAI-compatible server")
add_serve_args(parser)
run_serve(parser.parse_args())
