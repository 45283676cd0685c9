"""Runs left RUNNING by a step process that was killed, found and ended FAILED by a later main.

SIGKILL, the OOM killer or a power cut end a step without letting it end its run. Every step run
is tagged with its host, pid and the process's start time (`this_process`); a later `main` on the
same host ends FAILED each RUNNING run whose process is gone (`mark_stale_runs`).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from phi3flow.core import names, redact, store

logger = logging.getLogger(__name__)


def this_process() -> dict[str, str]:
    return {names.TAG_HOST: socket.gethostname(), names.TAG_PID: str(os.getpid()),
            names.TAG_PROCESS_START: process_start(os.getpid()) or "unknown"}


def process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot, Linux /proc), or None if it is gone.

    A pid alone can be reused by a later process; the pair (pid, start time) cannot.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (macOS): existence only
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "unknown"
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie (killed, not yet reaped: no init in containers)
        return None
    return fields[19]  # field 22, starttime


def mark_stale_runs(experiment_id: str) -> list[str]:
    """End FAILED the RUNNING step runs of this host whose process no longer exists.

    A step killed with SIGKILL (or by the OOM killer, or a crash) cannot end its own run; without
    this it would show RUNNING forever. Runs of other hosts, of live processes and runs without
    our process tags are left alone. Returns the run IDs it marked.
    """
    host = socket.gethostname()
    client = mlflow.MlflowClient()
    marked = []
    for run in store.current().runs_tagged(experiment_id, names.TAG_HOST, host):
        if run.info.status != "RUNNING":
            continue
        tags = run.data.tags
        pid, started = tags.get(names.TAG_PID, ""), tags.get(names.TAG_PROCESS_START)
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        now = process_start(int(pid))
        if now is not None and (now == started or "unknown" in (now, started)):
            continue  # still running (or cannot tell): leave it
        reason = (f"process {pid} on {host} that ran this step ended without ending the run "
                  "(killed with SIGKILL, out of memory or a crash); marked FAILED by a later main")
        try:
            client.set_tag(run.info.run_id, names.TAG_STALE, reason)
            client.set_tag(run.info.run_id, names.TAG_ERROR, reason)
            client.set_terminated(run.info.run_id, "FAILED")
        except MlflowException as exc:
            # A store may let this process write only to its own runs (an Azure ML job's run
            # token): the run stays as it is, and main goes on.
            logger.warning("run %s (%s) looks stale but could not be ended: %s",
                           run.info.run_id, tags.get(names.TAG_STEP), redact.error_text(exc, 300))
            continue
        logger.warning("run %s (%s): %s", run.info.run_id, tags.get(names.TAG_STEP), reason)
        marked.append(run.info.run_id)
    return marked
