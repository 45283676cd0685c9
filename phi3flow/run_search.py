"""The run search every tracking store answers: one tag compared with `=`.

An Azure ML workspace refuses filters on run attributes (a run's status among them), `LIKE`,
`OR`, `!=` on tags and ordering by most fields (docs/decisions.md, "What the workspace stand-in
answers"). So the steps search by one tag, and check a run's status and pick the newest
themselves (phi3flow/reuse.py, phi3flow/stale.py).
"""

from __future__ import annotations

import mlflow
from mlflow.entities import Run

# The most runs one tag search reads (in pages): a host's step runs over a long time.
MAX_TAGGED_RUNS = 10_000


def runs_tagged(experiment_id: str, key: str, value: str) -> list[Run]:
    """The runs of an experiment whose tag `key` is `value`, in no particular order."""
    if "'" in value or "`" in key:
        raise ValueError(f"tag {key}={value!r}: quotes cannot be searched for")
    return mlflow.search_runs(experiment_ids=[experiment_id],
                              filter_string=f"tags.`{key}` = '{value}'",
                              max_results=MAX_TAGGED_RUNS, output_format="list")
