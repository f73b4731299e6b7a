"""The GitHub workflows and the MLproject: valid against their schemas, pointing at things
that exist."""

from __future__ import annotations

import fnmatch
import subprocess

import pytest
import yaml

from cxr.params import PROFILES
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


@pytest.mark.parametrize("entry", ["main", "demo", "real_cpu", "train", "evaluate", "register"])
def test_mlproject_entry_points_run_dvc_stages_that_exist(entry):
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    command = project["entry_points"][entry]["command"]
    words = command.split()
    if words[0] == "cxr":  # the whole pipeline with a params.yaml profile
        assert words[1:3] in (["demo"], ["profile", entry]), command
        assert entry == "demo" or entry in PROFILES
    else:
        assert words[:2] == ["dvc", "repro"], command
        stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
        for word in words[2:]:
            assert word.split("@")[0] in stages, word
    env = yaml.safe_load((ROOT / project["python_env"]).read_text())
    assert "-r requirements.lock" in env["dependencies"]
