"""main's orchestration: run each step as a child `mlflow run`, or reuse a finished one.

Each step runs through `mlflow.projects.run` on this same project directory, in this same
environment (`env_manager="local"`: main already runs inside the project's environment), as a
child of the main run. Steps hand each other run IDs only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import mlflow.projects

from phi3flow import names, reuse, tracking
from phi3flow.errors import StepError

logger = logging.getLogger(__name__)


@dataclass
class StepRunner:
    experiment_id: str
    force: bool
    project_root: Path = reuse.PROJECT_ROOT
    git_commit: str | None = None  # of the main run, when `mlflow run` recorded one
    code_sha256: str = field(default_factory=reuse.code_sha256)
    reused: list[str] = field(default_factory=list)

    def run(
        self,
        entry_point: str,
        params: dict[str, str],
        inputs: list[Path] = (),
        reusable: bool = True,
    ) -> str:
        """The run ID of a FINISHED `entry_point` run for these params: reused or new."""
        key = reuse.cache_key(entry_point, params, self.code_sha256, list(inputs),
                              self.git_commit)
        if self.force:
            logger.info("%s: force=true, running it again", entry_point)
        elif not reusable:
            logger.info("%s: inputs may have moved (unpinned revision), running it again",
                        entry_point)
        elif previous := reuse.find_reusable(self.experiment_id, entry_point, key):
            logger.info("%s: reusing finished run %s (same parameters, inputs and code)",
                        entry_point, previous.info.run_id)
            self.reused.append(entry_point)
            return previous.info.run_id
        logger.info("%s: starting a child run", entry_point)
        tracking.child_environment()  # the step inherits os.environ, token included
        submitted = mlflow.projects.run(
            uri=str(self.project_root),
            entry_point=entry_point,
            parameters=params,
            experiment_id=self.experiment_id,
            env_manager="local",
            synchronous=False,
        )
        run_id = submitted.run_id
        try:
            succeeded = submitted.wait()
        except BaseException:  # main interrupted (Ctrl-C, SIGTERM): stop the child step too
            submitted.cancel()
            _end_failed_if_running(run_id)
            raise
        if not succeeded:
            _end_failed_if_running(run_id)  # a step killed before it could end its own run
            raise StepError(
                f"step {entry_point} failed (run {run_id}); its log is above. Fix the cause and "
                "re-run main: finished steps are reused."
            )
        client = mlflow.MlflowClient()
        client.set_tag(run_id, names.TAG_CACHE_KEY, key)
        client.set_tag(run_id, names.TAG_CODE_SHA256, self.code_sha256)
        return run_id


def _end_failed_if_running(run_id: str) -> None:
    client = mlflow.MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")
