"""Benchmark case families; importing this package registers them all. Each op issue adds a module."""
from . import handoff, machine, rnn  # noqa: F401
