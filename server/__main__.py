"""`python -m server`: the same as `asyncpp serve`."""
import argparse

from asyncpp.serve_cli import add_serve_args, run_serve

parser = argparse.ArgumentParser(prog="python -m server", description="asyncpp's OpenAI-compatible server")
add_serve_args(parser)
run_serve(parser.parse_args())
