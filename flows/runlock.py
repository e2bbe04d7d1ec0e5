"""One run at a time per run folder: a second run of the same recipe into the same output folder waits for the
first (then finds its stages in the cache) instead of racing it over the same files. Everything that prepares data
or exports into a folder holds its lock, so holding it also makes it safe to remove what killed runs left there
(export staging folders, dedup signature spills)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
# Only what the folder's lock holder alone writes: export's staging, the data stage's dedup spill. Not the `.tmp` of
# atomic writes: a run holding another folder's lock may be writing one here (a model's token-filtered copy of data
# it shares through the cache), and an orphaned one is a small hidden file that nothing reads.
LEFTOVERS = (".artifact.staging-*", ".artifact.old-*", "data/**/.signatures-*.bin")
WAIT_LOG_S = 60  # how often a waiting run says again who it waits for


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, holder: str):
    """Hold `run_dir`'s lock for the block, waiting (and saying for whom) while another run holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_NAME, "a+") as handle:
        _acquire(handle, run_dir)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
            handle.flush()
            remove_leftovers(run_dir)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(handle, run_dir: Path) -> None:
    said = 0.0
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() - said > WAIT_LOG_S:
                handle.seek(0)
                log.warning("run folder %s is in use by %s: waiting for it to finish (its stages are then reused)",
                            run_dir, handle.read() or "another run")
                said = time.monotonic()
            time.sleep(1)


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete what killed runs left behind; only called under the lock, so no live run owns any of it."""
    removed = []
    for pattern in LEFTOVERS:
        for path in run_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(run_dir)))
    if removed:
        log.info("removed what an interrupted run left in %s: %s", run_dir, ", ".join(sorted(removed)))
    return removed
