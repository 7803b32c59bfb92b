"""`python -m asyncpp.server`: the same as `asyncpp serve`."""
from asyncpp.server.cli import main

main()
