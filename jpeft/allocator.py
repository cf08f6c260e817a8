"""The glibc malloc settings every `jpeft` command and both sides of every bench run under.

XLA on CPU frees and reallocates GBs of temporaries every step. By default glibc returns that memory
to the OS and faults it back in each step; these settings keep it (docs/design.md §8). They must be in
the environment before the process starts, so `cli.entry` re-executes itself with them and the bench
starts its subprocesses under them.
"""
from __future__ import annotations

from typing import Mapping

# Four arenas, not one: XLA:CPU's threads malloc small task closures all through a step, and in a single
# arena they queue for its lock (a batch-8 decoding step 7.5 -> 8.9 ms on the bench model; the train step
# the same speed either way, peak RSS within 2%). Freed memory kept (no trim) instead of returned and
# re-faulted every step; only blocks of >= 256 MiB (a step's temporaries) mmapped, so freeing them never
# leaves a hole that smaller buffers split; transparent huge pages, so mapping them again costs ~500x
# fewer faults.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "4", "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
              "MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_TOP_PAD_": str(256 * 2**20),
              "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
MALLOC_TUNABLE = "glibc.malloc."


def user_tuned(environ: Mapping[str, str]) -> bool:
    """Has the user chosen malloc settings of their own (a MALLOC_* variable or a glibc.malloc tunable)?
    Tunables of other glibc parts are not a malloc choice."""
    return (any(name.startswith("MALLOC_") for name in environ)
            or any(t.startswith(MALLOC_TUNABLE) for t in _tunables(environ)))


def tuned(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set over `environ` for the tuned allocator: MALLOC_ENV, with the GLIBC_TUNABLES
    already there that are not malloc's kept before ours."""
    others = [t for t in _tunables(environ) if not t.startswith(MALLOC_TUNABLE)]
    return {**MALLOC_ENV, "GLIBC_TUNABLES": ":".join([*others, MALLOC_ENV["GLIBC_TUNABLES"]])}


def _tunables(environ: Mapping[str, str]) -> list[str]:
    return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
