"""Every name shared between steps, in one place: defaults, artifact paths, tag keys.

A step writes an artifact or a tag under one of these names and the next step reads it back by the
same constant, so a rename cannot silently break the chain. A step's output is named after the
parameter that consumes it: a fetch_model run's ID is `fetch_run_id` wherever it appears.
"""

from pathlib import Path

# The project directory (MLproject, conda.yaml, data/): relative inputs resolve against it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

# --- The model this project packages, pinned. -------------------------------------------------
DEFAULT_MODEL_ID = "microsoft/Phi-3-mini-4k-instruct"
# A commit of microsoft/Phi-3-mini-4k-instruct (not the moving `main` branch), so two users who
# run the defaults get the same weights. Used only when `revision` is left empty; any other
# commit is one -P revision=... away (docs/decisions.md, "Pinned downloads").
DEFAULT_MODEL_REVISION = "f39ac1d28e925b323eae81227eaba4464caced4e"

ONNX_HUB_REPO = "microsoft/Phi-3-mini-4k-instruct-onnx"
# The published CPU variant; the builder's defaults (-p int4 -e cpu) reproduce it.
ONNX_HUB_SUBFOLDER = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
# The commit of ONNX_HUB_REPO used when `onnx_revision` is left empty; it holds
# ONNX_HUB_SUBFOLDER (docs/decisions.md, "Pinned downloads"). Every downloaded file is checked
# against the hub's own sizes and hashes (phi3flow/fetching/hub.py).
DEFAULT_ONNX_REVISION = "5f5f794c1c23c9d5ee142af85df02a6cc52d6945"

# --- Entry points (MLproject names). ----------------------------------------------------------
FETCH_MODEL = "fetch_model"
LOG_TRANSFORMERS = "log_transformers"
LOG_ONNX_PYFUNC = "log_onnx_pyfunc"
EVALUATE = "evaluate"
REGISTER = "register"
MAIN = "main"
BATCH_SCORE = "batch_score"  # not part of main: it runs a registered model over a dataset

# --- Artifacts of a fetch_model run. ----------------------------------------------------------
MANIFEST = "manifest.json"  # every fetched file with size and sha256, plus the source ids
CHECKPOINT_DIR = "checkpoint"  # Hugging Face checkpoint (config, weights, tokenizer)
ONNX_DIR = "onnx"  # onnxruntime-genai model folder (genai_config.json, model.onnx, ...)
RESOLVED_CONFIG = "config.json"  # each step's resolved config, logged as an artifact

# --- Artifacts of the other steps. ------------------------------------------------------------
REGISTRATION = "registration.json"  # register: version, alias, why (registry.Registration)
PRODUCED = "produced.json"  # main: every step's run ID and the model URIs (pipeline.Produced)
SCORED_DIR = "scored"  # batch_score: the scored rows (Parquet), when no `output` is given
BATCH_SCORE_RESULT = "batch_score.json"  # batch_score: what it scored (batch_score.BatchScored)

# --- Logged model names (log_model(name=...)). ------------------------------------------------
TRANSFORMERS_MODEL_NAME = "phi3-transformers"
ONNX_MODEL_NAME = "phi3-onnx"
DEFAULT_REGISTERED_MODEL = "phi3-mini-4k-instruct-chat"

# --- Artifacts of an evaluate run. ------------------------------------------------------------
DECISION = "decision.json"  # thresholds, each model's pass/fail with reasons, the chosen one
EVAL_TABLE = "eval_table.json"  # per row: question, expected, both answers, scores, latencies
EVAL_CHART = "comparison.png"
# On each model's evaluation run, where the store has no traces: per row, the answer and each
# scorer's value and rationale (phi3flow/evaluation/evaluate.py, score_without_traces).
EVAL_RESULTS = "eval_results.json"

# --- Tags. ------------------------------------------------------------------------------------
TAG_PREFIX = "phi3flow."
TAG_STEP = TAG_PREFIX + "step"  # the entry point a run belongs to: upstream runs are checked on it
TAG_ERROR = TAG_PREFIX + "error"  # why a run ended FAILED, one line
TAG_MODEL_URI = TAG_PREFIX + "model_uri"  # the model a log step's run produced
TAG_FETCH_RUN_ID = TAG_PREFIX + "fetch_run_id"
TAG_MODEL_ID = TAG_PREFIX + "model_id"
TAG_REVISION = TAG_PREFIX + "revision"
TAG_MANIFEST_SHA256 = TAG_PREFIX + "manifest_sha256"
TAG_ONNX_SOURCE = TAG_PREFIX + "onnx_source"
TAG_ONNX_PRECISION = TAG_PREFIX + "onnx_precision"
TAG_ONNX_EXECUTION_PROVIDER = TAG_PREFIX + "onnx_execution_provider"
TAG_INTERFACE = TAG_PREFIX + "interface"
# What the checkpoint's chat template does with system messages: kept or dropped (a logged
# model's and its run's tag; phi3flow/chat/system_messages.py).
TAG_SYSTEM_MESSAGES = TAG_PREFIX + "system_messages"
TAG_EVAL_DATA_SHA256 = TAG_PREFIX + "eval_data_sha256"
TAG_EVAL_DATA = TAG_PREFIX + "eval_data"  # the set evaluate read (eval_data=auto resolved)
# evaluate's child runs, one per model (MLflow GenAI evaluation runs): which model each scores.
TAG_EVALUATES = TAG_PREFIX + "evaluates"
# On each answer's trace: its row in the eval set and the row's category.
TRACE_TAG_ROW = TAG_PREFIX + "row"
TRACE_TAG_CATEGORY = "category"
TAG_EVALUATE_RUN_ID = TAG_PREFIX + "evaluate_run_id"
TAG_LOG_RUN_ID = TAG_PREFIX + "log_run_id"
TAG_GIT_COMMIT = TAG_PREFIX + "git_commit"  # a model version's: the commit of the code that ran
TAG_CHOSEN = TAG_PREFIX + "chosen"
TAG_UNVALIDATED = TAG_PREFIX + "unvalidated"
TAG_TRUST_REMOTE_CODE = TAG_PREFIX + "trust_remote_code"
TAG_CACHE_KEY = TAG_PREFIX + "cache_key"  # main's run-reuse key, see phi3flow/pipeline/reuse.py
TAG_CODE_SHA256 = TAG_PREFIX + "code_sha256"
TAG_REUSED = TAG_PREFIX + "reused"
TAG_SAVE_PRETRAINED = TAG_PREFIX + "save_pretrained"
TAG_REGISTERED_VERSION = TAG_PREFIX + "registered_version"
TAG_ALIAS = TAG_PREFIX + "alias"  # the alias a register run gave (champion or challenger)
# Model version tags: each key metric of the chosen model (`phi3flow.metric.quality_contains`).
TAG_METRIC_PREFIX = TAG_PREFIX + "metric."
# Model version tag where a registry has no usable alias API: `phi3flow.alias.champion = true`
# on the version that holds it (phi3flow/registry/register.py).
TAG_ALIAS_PREFIX = TAG_PREFIX + "alias."
# The process running a step's run, so a later `main` can tell a run whose process was killed
# (SIGKILL, OOM, power loss) from one still working: see phi3flow/core/stale.py.
TAG_HOST = TAG_PREFIX + "host"
TAG_PID = TAG_PREFIX + "pid"
TAG_PROCESS_START = TAG_PREFIX + "process_start"
TAG_STALE = TAG_PREFIX + "stale"
# batch_score's: the model it ran (an alias pinned to its version), that version, where the rows
# came from and where the scored rows went.
TAG_SCORED_MODEL_URI = TAG_PREFIX + "scored_model_uri"
TAG_SCORED_MODEL_VERSION = TAG_PREFIX + "scored_model_version"
TAG_INPUT = TAG_PREFIX + "input"
TAG_OUTPUT = TAG_PREFIX + "output"
# Set by `mlflow run` on a project run from git: the commit of the code that ran.
MLFLOW_GIT_COMMIT_TAG = "mlflow.source.git.commit"
