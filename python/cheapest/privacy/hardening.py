"""Process hardening for workers that hold request text in memory, and owner-only files.

A core dump would write prompts and completions to disk, so every worker
turns dumps off at start: RLIMIT_CORE = 0 stops the kernel writing a core
file, and PR_SET_DUMPABLE = 0 also keeps ptrace-based dumpers (and other
same-uid processes reading /proc/<pid>/mem) out.

Everything the service writes (the store, secrets, the rate-limit table, locks,
models) is its owner's alone, from creation: every command and worker sets the
umask to 077 first (`owner_only_files`), and the directories it keeps are made
0700 (`owner_only_dir`), an existing one tightened.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import stat
import sys
from pathlib import Path

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
log = logging.getLogger("cheapest.privacy")


def owner_only_files() -> None:
    """From now on this process creates files 0600 and directories 0700 (whatever mode a library asks for)."""
    os.umask(0o077)


def owner_only_dir(path: Path) -> None:
    """`path` (and missing parents) created 0700; an existing directory of this user's that others may read is
    tightened to 0700, with one log line naming it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
        log.warning("tightened the directory %s to owner-only access", path)


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
