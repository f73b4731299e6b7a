"""The GitHub workflows and the MLproject: valid against their schemas, pointing at things
that exist."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib

import pytest
import yaml

from cxr.params import PROFILES, load_params
from tests.conftest import BIN, ROOT

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def _check(paths) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *paths],
        capture_output=True,
        text=True,
    )


def test_workflows_match_githubs_schema():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "retrain.yml"}
    proc = _check(map(str, WORKFLOWS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_schema_check_catches_a_broken_workflow(tmp_path):
    broken = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    broken["jobs"]["test"]["runs-on"] = {"not": "a runner"}
    broken["jobs"]["test"]["steps"][0] = {"uses": "actions/checkout@v4", "bogus": 1}
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    assert _check([str(path)]).returncode != 0


def _tracked() -> list[str]:
    return subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def test_retrain_trigger_paths_exist():
    on = yaml.safe_load((ROOT / ".github" / "workflows" / "retrain.yml").read_text())[True]
    paths = on["push"]["paths"]
    assert {"params.yaml", "dvc.yaml", "data.dvc", "src/**", "stages/**"} <= set(paths)
    files = _tracked()
    for pattern in paths:
        assert any(fnmatch.fnmatch(f, pattern) for f in files), f"{pattern} matches nothing"
    assert set(on) >= {"push", "workflow_dispatch", "schedule"}


def test_dispatch_inputs_reach_the_shell_through_the_environment_only():
    """`${{ inputs.x }}` inside a `run:` script is a script-injection hole."""
    for workflow in WORKFLOWS:
        for job in yaml.safe_load(workflow.read_text())["jobs"].values():
            for step in job["steps"]:
                assert "${{ inputs." not in step.get("run", ""), (workflow.name, step)


def test_workflows_pin_actions_to_commits_and_grant_least_privilege():
    for workflow in WORKFLOWS:
        spec = yaml.safe_load(workflow.read_text())
        assert spec.get("permissions") in ({}, {"contents": "read"}), workflow.name
        for job in spec["jobs"].values():
            assert set(job.get("permissions", {}).values()) <= {"read", "write"}
            for step in job["steps"]:
                if "uses" in step:
                    action, _, ref = step["uses"].partition("@")
                    assert len(ref) == 40 and int(ref, 16) >= 0, (workflow.name, step["uses"])


def test_retraining_gives_each_secret_only_to_the_steps_that_need_it():
    text = (ROOT / ".github" / "workflows" / "retrain.yml").read_text()
    job = yaml.safe_load(text)["jobs"]["retrain"]
    # `dvc exp push` and the results branch; the results pull request
    assert job["permissions"] == {"contents": "write", "pull-requests": "write"}
    assert not any("secrets." in str(v) for v in job.get("env", {}).values())
    needs = {
        "KAGGLE_API_TOKEN": {"Dataset version", "Retrain"},
        "MLFLOW_TRACKING_URI": {"Retrain"},
        "DVC_REMOTE_URL": {"Retrain"},
        "AWS_SECRET_ACCESS_KEY": {"Retrain"},
    }
    for step in job["steps"]:
        given = {k for k, v in step.get("env", {}).items() if "secrets." in str(v)}
        for secret, steps in needs.items():
            assert (secret in given) == (step.get("name") in steps), (secret, step.get("name"))
        assert "secrets." not in str(step.get("with", "")) and "secrets." not in step.get("run", "")
    install = next(s for s in job["steps"] if s.get("name", "").startswith("Install"))
    assert "env" not in install


def test_retraining_runs_the_rehearsed_script_with_every_storage_plugin():
    """tests/test_retrain.py runs .ci/retrain end to end; the workflow must run that script,
    in a full clone, with the plugins for each remote kind `cxr.retrain.check` accepts."""
    from cxr.retrain import REMOTE_PLUGINS

    steps = yaml.safe_load((ROOT / ".github" / "workflows" / "retrain.yml").read_text())
    steps = steps["jobs"]["retrain"]["steps"]
    runs = [s.get("run", "") for s in steps]
    assert sum(".ci/retrain 2>&1" in r for r in runs) == 1
    assert steps[0]["uses"].startswith("actions/checkout@")
    assert steps[0]["with"]["fetch-depth"] == 0
    install = next(r for r in runs if "make install" in r)
    extras = install.split("EXTRAS=")[1].split()[0].split(",")
    assert {extra for _, extra in REMOTE_PLUGINS.values()} <= set(extras)
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(extras) <= set(optional["optional-dependencies"])
    locked = (ROOT / "requirements.lock").read_text()
    for module, _ in REMOTE_PLUGINS.values():  # each plugin at an exact version
        assert re.search(rf"^{module.replace('_', '-')}==\d", locked, re.M), module


PROJECT = yaml.safe_load((ROOT / "MLproject").read_text())
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
MODELS = load_params(ROOT / "params.yaml")["train"]["models"]


def test_mlproject_runs_in_the_locked_environment():
    env = yaml.safe_load((ROOT / PROJECT["python_env"]).read_text())
    assert "-r requirements.lock" in env["dependencies"]
    assert set(PROJECT["entry_points"]) == {"main", *PROFILES, "train", "evaluate", "register"}


@pytest.mark.parametrize("entry", ["main", "train", "evaluate", "register"])
def test_mlproject_entry_points_repro_stages_that_exist(entry):
    spec = PROJECT["entry_points"][entry]
    defaults = {k: v.get("default") for k, v in spec.get("parameters", {}).items()}
    words = spec["command"].format(**defaults).split()
    assert words[:2] == ["dvc", "repro"], words
    targets = words[2:]
    if entry == "main":  # no target: every stage, through to the registered champion
        assert targets == [] and "register" in STAGES
    for target in targets:
        stage, _, item = target.partition("@")
        assert stage in STAGES, target
        assert ("matrix" in STAGES[stage]) == bool(item), target
        assert not item or item in MODELS, target


@pytest.mark.parametrize("entry", PROFILES)
def test_mlproject_profiles_run_the_whole_pipeline_with_their_overrides(entry, tmp_path):
    spec = PROJECT["entry_points"][entry]
    command = spec["command"].format(archive=tmp_path).split()
    assert command[0] == "cxr"
    out = subprocess.run(
        [str(BIN / "cxr"), *command[1:], "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    printed = out.stdout.strip().splitlines()[-1]
    assert printed.startswith("+ dvc exp run --temp")  # every stage, the workspace untouched
    profile = load_params(ROOT / "params.yaml")[entry]
    for key in profile:
        assert f" {key}=" in printed or f" +{key}=" in printed or f" '{key}=" in printed, key
