"""Process hardening for workers that hold request text in memory.

A core dump would write prompts and completions to disk, so every worker
turns dumps off at start: RLIMIT_CORE = 0 stops the kernel writing a core
file, and PR_SET_DUMPABLE = 0 also keeps ptrace-based dumpers (and other
same-uid processes reading /proc/<pid>/mem) out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def disable_core_dumps() -> None:
    """Turn core dumps off for this process (idempotent). Raises OSError if the kernel refuses."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = _libc()
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "prctl(PR_SET_DUMPABLE, 0) failed")


def core_dumps_disabled() -> bool:
    """True when this process can produce no core dump."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if soft != 0 or hard != 0:
        return False
    if sys.platform.startswith("linux"):
        return _libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
    return True
