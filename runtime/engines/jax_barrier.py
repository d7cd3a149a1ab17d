"""A barrier of several JAX processes on jax.distributed's coordination service.

A collective's first run sets up its connections with a fixed deadline (gloo on CPU: 30 s), so a
process that reaches it much later than the others (a busy machine, a colder compilation cache)
fails them all. Meeting here first, with a deadline of our own, lets the collective start
together. The barrier is a service call, no device collective.
"""
from __future__ import annotations

import itertools

WAIT_S = 1200  # how long the processes wait for each other here
_calls = itertools.count()


def wait_for_every_jax_process(name: str) -> None:
    """Return once every JAX process has called this (each process calls it the same number of
    times, in the same order); at once with a single process."""
    import jax
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client JAX's own checkpointing waits on
    distributed.global_state.client.wait_at_barrier(f"{name} #{next(_calls)}",
                                                    timeout_in_ms=WAIT_S * 1000)
