"""One live run per out_dir: a second `jpeft train` into the directory of a run still going would interleave
their checkpoints and metrics. The guard is an flock on out_dir/.jpeft.lock, which the kernel drops when its
process ends however it ends (no stale lock after a crash or a kill -9); the file names the holder's pid."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os

from jpeft.errors import TrainingError

log = logging.getLogger("jpeft.train")
LOCK_FILE = ".jpeft.lock"


@contextlib.contextmanager
def out_dir_lock(out_dir: str):
    """Hold out_dir for this process, or raise naming the process that holds it."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, LOCK_FILE), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise TrainingError(f"{out_dir} is the out_dir of a run still going (process {f.read().strip() or '?'}); "
                                "let it finish or stop it (it resumes from its checkpoint), or set another "
                                "out_dir") from None
        except OSError as e:  # a file system without locks (some network mounts): run unguarded, and say so
            log.warning("%s: cannot lock it (%s); nothing stops a second run from writing into it", out_dir, e)
            yield
            return
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
