"""The project's contract files agree with the code: MLproject, environments, README, CI."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from mlflow.projects._project_spec import load_project

from phi3flow.core import config
from phi3flow.pipeline.config import STEP_CONFIGS
from tests.helpers import ROOT

RUN_ID = "0123456789abcdef0123456789abcdef"


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_step_has_an_entry_point_and_a_script():
    project = load_project(str(ROOT))
    assert set(project._entry_points) == set(STEP_CONFIGS)
    for step in STEP_CONFIGS:
        assert (ROOT / "steps" / f"{step}.py").is_file()


@pytest.mark.parametrize("step", sorted(STEP_CONFIGS))
def test_mlproject_command_parses_with_the_steps_parser(step):
    """Same names, same defaults, and the command MLflow builds is accepted by the step."""
    entry = load_project(str(ROOT)).get_entry_point(step)
    cls = STEP_CONFIGS[step]
    fields = {f.name: f for f in config.cli_fields(cls)}
    assert set(entry.parameters) == set(fields), "MLproject parameters != config fields"
    for name, param in entry.parameters.items():
        default = fields[name].default
        assert str(param.default) == config._to_param(default), f"{step}.{name} default differs"
    # The command exactly as `mlflow run` renders it from the defaults (plus a run ID).
    overrides = {name: RUN_ID for name in entry.parameters if name.endswith("run_id")}
    if "model_id" in entry.parameters:
        overrides["model_id"] = str(ROOT / "tests" / "fixtures" / "tiny-phi3")
        overrides["onnx_source"] = "build"
    if "input" in entry.parameters:  # batch_score's required rows
        overrides["input"] = str(ROOT / "data" / "eval-phi3.jsonl")
    command = entry.compute_command(overrides, storage_dir=None)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", f"steps.{step}"]
    parsed = config.parameters(config.parse_config(cls, argv[3:]))
    for name, value in overrides.items():
        assert parsed[name] == value


def test_environment_files_follow_requirements_txt():
    pins = _requirements()
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    conda_pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    python_env = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    assert conda_pip == pins
    assert python_env["dependencies"] == pins
    # An exact Python: pyenv (MLflow's virtualenv manager) then needs no download where it has it.
    assert "python=3.11.7" in conda["dependencies"] and python_env["python"] == "3.11.7"
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", pin) for pin in pins), "unpinned"


def test_mlproject_declares_exactly_one_environment():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert ("conda_env" in spec) != ("python_env" in spec)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    setup = [b.strip() for b in blocks if "pip install" in b]
    assert len(setup) == 2, "README must hold exactly two set-up commands"
    test_command = next(b for b in setup if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_the_serve_command_is_the_front_door():
    """`phi3flow-serve` (pyproject's console script) runs what `python -m phi3flow.front_door`
    runs."""
    import tomllib

    from phi3flow import front_door
    from phi3flow.serving import front_door as server

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["phi3flow-serve"].split(":")
    assert (module, function) == (server.__name__, "main") and front_door.main is server.main
