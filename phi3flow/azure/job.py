"""The job's side of `mlflow run --backend azureml-v2`: run one entry point into the job's run.

    python -m phi3flow.azure.job -e main [--source-url URL --source-commit COMMIT] [-P k=v ...]

This is the command of the Azure ML command job that `phi3flow/azure/backend.py` submits. Azure
ML creates an MLflow run for every job (its run ID is the job's name) and points MLflow at it
through the environment; Azure overwrites any `MLFLOW_*` variable the job itself sets, so the
environment cannot be fixed in the job's definition, only here:

- `MLFLOW_TRACKING_URI` is the workspace's `azureml://...` URI, which `azureml-mlflow` (pinned in
  requirements.txt) serves: runs, metrics, artifacts, models and the registry.
- `MLFLOW_RUN_ID` is the job's run. The entry point runs *into that run* (`mlflow run --run-id`),
  so the run the user's `mlflow run` printed is the one that holds the results.
- `MLFLOW_EXPERIMENT_ID` and `MLFLOW_EXPERIMENT_NAME` may both be set, and `mlflow run` refuses
  both ("Specify only one of ..."): the experiment is taken from the job's run and only its ID is
  kept, so every child run lands beside it.

The project is always the uploaded code (the working directory). For a git URL the backend
uploaded the checkout it made at the resolved commit, so the job needs neither a `git` binary
nor the repository's credentials; `--source-url` and `--source-commit` say where it came from,
and are recorded on the job's run as MLflow's own git tags (which `main` and `register` read).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from phi3flow.core import redact

# Set by Azure ML inside every job (azureml-mlflow reads them; see docs/decisions.md).
RUN_ID = "MLFLOW_RUN_ID"
EXPERIMENT_ID = "MLFLOW_EXPERIMENT_ID"
EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"
TRACKING_URI = "MLFLOW_TRACKING_URI"

logger = logging.getLogger("phi3flow.azure.job")


class JobEnvironmentError(Exception):
    """The job was started without what Azure ML gives a job; the message says what is missing."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-e", "--entry_point", required=True)
    parser.add_argument("--source-url", default="", help="the git URL the code was checked "
                        "out from (recorded, not fetched)")
    parser.add_argument("--source-commit", default="", help="the commit of that checkout")
    parser.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"-P {item!r}: expected KEY=VALUE")
        params[key] = value
    args.params = params
    return args


def normalise_environment(environ: dict[str, str], experiment_id: str) -> None:
    """One experiment, by ID: the job run's own (both variables set makes `mlflow run` abort)."""
    environ.pop(EXPERIMENT_NAME, None)
    environ[EXPERIMENT_ID] = experiment_id


def job_run_id(environ: dict[str, str]) -> str:
    missing = [name for name in (RUN_ID, TRACKING_URI) if not environ.get(name)]
    if missing:
        raise JobEnvironmentError(
            f"{', '.join(missing)} not set: this is the command of an Azure ML job, which sets "
            "them to the job's MLflow run and the workspace. To run the project elsewhere, use "
            "`mlflow run . -e <entry point>`.")
    return environ[RUN_ID]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact.install_log_filter()
    args = parse_args(argv)
    try:
        run_id = job_run_id(os.environ)
    except JobEnvironmentError as exc:
        logger.error("%s", exc)
        return 2
    import mlflow

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    _log_project_params(client, run_id, args)
    normalise_environment(os.environ, experiment_id)
    command = [sys.executable, "-m", "mlflow", "run", ".", "-e", args.entry_point,
               "--env-manager", "local", "--run-id", run_id, "--experiment-id", experiment_id]
    for key, value in args.params.items():
        command += ["-P", f"{key}={value}"]
    logger.info("running entry point %s of %s into the job's run %s (experiment %s)",
                args.entry_point, args.source_url or "the uploaded project", run_id,
                experiment_id)
    # Replace this process: `mlflow run` starts with the normalised environment, and nothing of
    # this process (its MLflow client, built before the normalisation) outlives the start.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, os.environ)
    return 0  # not reached


def _log_project_params(client, run_id: str, args: argparse.Namespace) -> None:
    """What `mlflow run` logs on a run it creates, which it skips for a given `--run-id`: the
    parameters, the entry point and the source, with the git tags for a git-URL project."""
    from mlflow.entities import Param
    from mlflow.projects import _project_spec
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_COMMIT,
        MLFLOW_GIT_REPO_URL,
        MLFLOW_PROJECT_ENTRY_POINT,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
    )

    entry = _project_spec.load_project(".").get_entry_point(args.entry_point)
    final, extra = entry.compute_parameters(args.params, storage_dir=None)
    logged = client.get_run(run_id).data.params
    params = [Param(k, v) for k, v in {**final, **extra}.items() if k not in logged]
    if params:
        client.log_batch(run_id, params=params)
    tags = {MLFLOW_PROJECT_ENTRY_POINT: args.entry_point, MLFLOW_SOURCE_TYPE: "PROJECT",
            MLFLOW_SOURCE_NAME: args.source_url or "."}
    if args.source_url:
        tags |= {MLFLOW_GIT_REPO_URL: args.source_url, MLFLOW_GIT_COMMIT: args.source_commit}
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


if __name__ == "__main__":
    sys.exit(main())
