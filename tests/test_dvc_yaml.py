"""dvc.yaml declares what each stage uses: a code change or a param change reruns exactly the
stages it can affect."""

import ast
from pathlib import Path

import pytest
import yaml

from cxr.params import ParamsError, load_params, stage_params

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "cxr"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# Modules that cannot change a stage's outputs: terminal noise, error messages, timings, and
# the table of settings (what params.yaml accepts and its help: an accepted value reaches the
# stage unchanged), so that editing a help line reruns nothing.
NOT_RESULTS = {"console", "errors", "timing", "settings"}


def cxr_imports(path: Path) -> set[str]:
    """The cxr modules that `path` imports anywhere (functions' bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "cxr":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cxr."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cxr.")}
    return found


def import_chain(script: Path) -> set[str]:
    """Every cxr module that `script` can run, through imports of imports."""
    seen: set[str] = set()
    todo = cxr_imports(script)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= cxr_imports(SRC / f"{module}.py") - seen
    return seen


def test_the_import_chain_sees_imports_inside_functions(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("from cxr import files\ndef f():\n    import cxr.pyfunc_classifier\n")
    chain = import_chain(script)
    assert {"files", "processes", "pyfunc_classifier", "images"} <= chain  # and what they import


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_the_stage_scripts_import_chain(stage):
    spec = STAGES[stage]
    script = spec["cmd"].split()[1]
    assert script in spec["deps"]
    needed = {f"src/cxr/{m}.py" for m in import_chain(ROOT / script) - NOT_RESULTS}
    declared = {d for d in spec["deps"] if isinstance(d, str) and d.startswith("src/")}
    assert not needed - declared, f"{stage} runs code dvc.yaml does not list"
    assert not declared - needed, f"{stage} lists code it never runs (needless reruns)"


def test_editing_the_settings_table_reruns_no_stage():
    """Every stage validates its params through the table (it is in every import chain), and
    none lists it: a help line or a range edited there changes no stage's dependencies."""
    for stage, spec in STAGES.items():
        assert "settings" in import_chain(ROOT / spec["cmd"].split()[1]), stage
        assert "src/cxr/settings.py" not in spec["deps"], stage


def test_a_stage_reads_only_the_params_it_declares(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    params = stage_params("train", {"model": "cnn"}, path=tmp_path / "params.yaml")
    everything = load_params(tmp_path / "params.yaml")
    assert params["train"]["seed"] == everything["train"]["seed"]
    assert set(params["models"]) == {"cnn"}  # ${item.model} filled in
    with pytest.raises(ParamsError, match=r"'train' reads params.yaml's 'train.checkpoint_"):
        params["train"]["checkpoint_seconds"]
    with pytest.raises(ParamsError, match="reads params.yaml's 'data', which its params in dvc"):
        params["data"]["classes"]
    untracked = stage_params(
        "train", {"model": "cnn"}, ("train.checkpoint_seconds",), tmp_path / "params.yaml"
    )
    assert untracked["train"]["checkpoint_seconds"] >= 0
    whole = stage_params("prepare", path=tmp_path / "params.yaml")
    assert set(whole) == {"data", "prepare", "mlflow"} and "image_size" in whole["prepare"]
