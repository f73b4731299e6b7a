import inspect
import json
import re
import shutil

import pytest
import yaml

from cxr.classes import DATASET_DIR, FOLDER_TO_LABEL, LABEL_TO_FOLDER, LABELS, check_labels
from cxr.cli import build_parser, checked_exp_run_command, main, profile_command
from cxr.errors import CxrError
from cxr.models import LUNG_FOCUS_KEYS, MODELS, TRAINING_KEYS
from cxr.params import ParamsError, flatten, load_params, with_overrides
from cxr.settings import MODEL_SETTINGS
from tests.conftest import REAL_SAMPLE, ROOT


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason=f"real sample not found at {REAL_SAMPLE}")
def test_the_databases_own_folders_map_one_to_one_to_the_classes():
    """The real download's class folders (the sample keeps them: 'Viral Pneumonia' has a
    space) each name a class, and back."""
    folders = [f.name for f in (REAL_SAMPLE / DATASET_DIR).iterdir() if f.is_dir()]
    assert folders and all(LABEL_TO_FOLDER[FOLDER_TO_LABEL[f]] == f for f in folders)


def test_each_kaggle_folder_is_one_class_and_each_class_one_folder():
    assert len(set(FOLDER_TO_LABEL.values())) == len(FOLDER_TO_LABEL) == len(LABELS)
    assert all(FOLDER_TO_LABEL[LABEL_TO_FOLDER[label]] == label for label in LABELS)


def test_check_labels_orders_and_rejects():
    assert check_labels(["normal", "covid"]) == ["covid", "normal"]
    with pytest.raises(CxrError, match="'tb'"):
        check_labels(["covid", "tb"])


def _write(tmp_path, mutate):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("key", ["mixed_precision", "jit_compile", "deterministic"])
def test_tri_states_set_with_dash_s_say_auto_true_or_false_and_name_the_new_spelling(tmp_path, key):
    """`dvc exp run -S train.<key>=...` goes through DVC's apply_overrides, which writes `on`
    unquoted: read as DVC reads params.yaml (YAML 1.2) it is the text 'on', refused in one line
    naming `true`, not YAML 1.1's boolean."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    for written, value in (("true", True), ("false", False), ("auto", "auto")):
        shutil.copy(ROOT / "params.yaml", path)
        apply_overrides(path, [f"train.{key}={written}"])
        assert load_params(path)["train"][key] == value
    for old, new in (("on", "true"), ("off", "false")):
        shutil.copy(ROOT / "params.yaml", path)
        apply_overrides(path, [f"train.{key}={old}"])
        with pytest.raises(ParamsError, match=rf"train.{key} is '{old}'; .*\(write {new} ") as err:
            load_params(path)
        assert "\n" not in str(err.value)


def test_the_top_up_is_one_switch_and_the_old_balance_names_it(tmp_path):
    path = _write(tmp_path, lambda p: p["data"].update(topup="viral"))
    assert load_params(path)["prepare"]["balance"] == "undersample"  # data.topup alone
    path = _write(tmp_path, lambda p: p["prepare"].update(balance="top-up"))
    with pytest.raises(ParamsError, match=r"balance is 'top-up'; .*\(write undersample \(the"):
        load_params(path)


def test_unknown_key_is_named(tmp_path):
    path = _write(tmp_path, lambda p: p["train"].update(epocs=3))
    with pytest.raises(ParamsError, match=r"train.*unknown key\(s\) \['epocs'\]"):
        load_params(path)


def test_wrong_type_and_source_are_named(tmp_path):
    path = _write(tmp_path, lambda p: p["train"].update(epochs="ten"))
    with pytest.raises(ParamsError, match="train.epochs"):
        load_params(path)
    path = _write(tmp_path, lambda p: p["data"].update(source="s3"))
    with pytest.raises(ParamsError, match="data.source is 's3'"):
        load_params(path)


def test_model_without_settings_is_named(tmp_path):
    path = _write(tmp_path, lambda p: p["train"].update(models=["cnn", "densenet"]))
    with pytest.raises(ParamsError, match="models.densenet"):
        load_params(path)


def test_demo_command_passes_each_override():
    command = profile_command("demo", params_path=ROOT / "params.yaml")
    assert command[:4] == ["dvc", "exp", "run", "--temp"]
    params = load_params(ROOT / "params.yaml")
    demo = params["demo"]
    assert demo["data.source"] == "synthetic"
    pairs = [command[i + 1] for i in range(4, len(command), 2)]
    assert "data.source=synthetic" in pairs and len(pairs) == len(demo)
    with pytest.raises(ParamsError, match=r"unknown key\(s\) \['new_key'\]"):
        checked_exp_run_command(params, {"train.epochs": 3, "mlflow.new_key": 1})


def test_every_model_key_is_set_with_dash_s_without_a_plus(tmp_path):
    """Each key a model takes (the table's, and train.augment's under its augment) is in
    params.yaml for every model, so `dvc exp run -S models.<m>.<key>=...` (DVC's own override
    code) sets it: Hydra refuses a key the file lacks unless written `+key`."""
    from dvc.utils.hydra import apply_overrides

    params = load_params(ROOT / "params.yaml")
    path = tmp_path / "params.yaml"
    for model in params["models"]:
        builder_keys = set(inspect.signature(MODELS[model]).parameters) - {
            "input_shape",
            "n_classes",
        }
        keys = [k for k in MODEL_SETTINGS if k in builder_keys | set(TRAINING_KEYS) - {"augment"}]
        keys += [f"augment.{k}" for k in params["train"]["augment"]]
        keys += list(LUNG_FOCUS_KEYS)
        shutil.copy(ROOT / "params.yaml", path)
        own = flatten(params["models"][model])
        apply_overrides(path, [f"models.{model}.{k}={json.dumps(own.get(k))}" for k in keys])
        assert load_params(path)["models"][model] == params["models"][model]


def test_profile_command_reads_an_archive(tmp_path):
    command = profile_command("real_cpu", tmp_path, ROOT / "params.yaml")
    pairs = [command[i + 1] for i in range(4, len(command), 2)]
    assert "data.source=archive" in pairs
    assert f"data.archive={tmp_path.resolve()}" in pairs
    # Its own classes: the three the real dev set has.
    assert 'data.classes=["covid", "normal", "pneumonia"]' in pairs


def test_the_settings_page_is_generated_from_the_table_and_current():
    from cxr import settings

    page = (ROOT / "docs" / "params.md").read_text()
    assert page == settings.markdown(load_params(ROOT / "params.yaml")), (
        "docs/params.md is stale: run `python -m cxr.settings > docs/params.md`"
    )
    for key, setting in {**settings.SETTINGS, **settings.MODEL_SETTINGS}.items():
        assert setting.help and "\n" not in setting.help and f"`{key}`" in page, key


def test_a_refused_value_is_named_with_what_it_accepts_and_its_help(tmp_path):
    from cxr.settings import SETTINGS

    params = with_overrides(load_params(ROOT / "params.yaml"), {"train.schedule": "linear"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml")
    assert str(err.value) == (
        "params.yaml: train.schedule is 'linear'; expected one of ['constant', 'cosine']: "
        f"{SETTINGS['train.schedule'].help}."
    )


def test_with_overrides_copies_and_sets_dotted_keys():
    params = {"a": {"b": 1}, "c": 2}
    result = with_overrides(params, {"a.b": 5, "a.new.deep": 3})
    assert result == {"a": {"b": 5, "new": {"deep": 3}}, "c": 2}
    assert params == {"a": {"b": 1}, "c": 2}


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": 3}) == {"a.b": 1, "a.c.d": [2], "e": 3}


def test_profile_command_line_checks_the_data_folder_first(tmp_path, monkeypatch, capsys):
    shutil.copy(ROOT / "params.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "real_cpu", "--archive", str(tmp_path), "--dry-run"]) == 2
    assert "run `make data`" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    extra = ["--", "-S", "prepare.balance_target=400"]
    assert main(["profile", "real_cpu", "--archive", str(tmp_path), "--dry-run", *extra]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("+ dvc exp run --temp") and "data.source=archive" in printed
    assert "-S prepare.balance_target=400 -n real-cpu-20" in printed  # then the dated name


def test_predict_defaults_to_the_champion_of_the_registered_model_name(
    tmp_path, monkeypatch, capsys
):
    params = (
        (ROOT / "params.yaml")
        .read_text()
        .replace("model_name: cxr-classifier", "model_name: renamed")
    )
    (tmp_path / "params.yaml").write_text(params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    assert main(["predict", str(tmp_path / "x.png")]) == 2
    assert "cannot load model 'models:/renamed@champion'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("prepare.image_size", -5, "prepare.image_size is -5; expected a whole number >= 16"),
        ("prepare.image_size", 0, "prepare.image_size is 0; expected a whole number >= 16"),
        ("prepare.balance_target", 0, "balance_target is 0; expected a whole number of images"),
        ("prepare.balance_target", "lung", "balance_target is 'lung'; expected one of data."),
        ("compare.metric", "f1", "compare.metric is 'f1'; expected one of ['accuracy'"),
        ("train.learning_rate", 0.0, "train.learning_rate is 0.0; expected a number in (0, 1]"),
        ("evaluate.ci_level", 1.5, "evaluate.ci_level is 1.5; expected a number in (0, 1]"),
        ("train.augment.zoom", 2.0, "train.augment.zoom is 2.0; expected a number in [0, 0.9]"),
        ("models.cnn.pooling", "mean", "models.cnn.pooling is 'mean'; expected one of ['max'"),
        ("models.cnn.dropout", 1.0, "models.cnn.dropout is 1.0; expected a number in [0, 1)"),
        ("models.cnn.filters", [32, 0], "models.cnn.filters is [32, 0]; expected a non-empty"),
        ("models.vgg16.dense_units", "big", "models.vgg16.dense_units is 'big'; expected a"),
        ("models.cnn4_bn.bn_momentum", 2, "models.cnn4_bn.bn_momentum is 2; expected a number"),
        # the wrong kind gets the same line: what it accepts and its help
        ("prepare.image_size", True, "prepare.image_size is True; expected a whole number >= 16"),
        ("train.epochs", "ten", "train.epochs is 'ten'; expected a whole number >= 1: the most"),
        ("prepare.balance_target", True, "balance_target is True; expected text or a whole"),
        ("models.cnn.augment", [1], "models.cnn.augment is [1]; expected a mapping of some of"),
    ],
)
def test_out_of_range_params_fail_before_any_work_naming_key_value_and_range(
    tmp_path, key, value, message
):
    params = with_overrides(load_params(ROOT / "params.yaml"), {key: value})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("prepare.image_size", 4, "prepare.image_size is 4"),
        ("models.cnn.dropuot", 0.5, "did you mean 'dropout'"),  # the builder's signature
        ("models.cnn4_bn.filters", [8, 8], "cnn4_bn has 4 conv blocks: give 4 filter counts"),
        ("models.vgg16.input_size", 16, "vgg16 needs inputs of at least 32 px"),
        ("models.cnn.filters", [8] * 7, "cnn needs inputs of at least 128 px"),  # 7 halvings
    ],
)
def test_a_profile_with_a_bad_override_fails_before_dvc_starts(tmp_path, key, value, message):
    params = load_params(ROOT / "params.yaml")
    params["demo"][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=message):
        profile_command("demo", params_path=tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epochs: [1, 2\n", r"params.yaml:3:1: not valid YAML \(expected ',' or ']'"),
        ("a: 1\n\tb: 2\n", r"params.yaml:2:1: not valid YAML"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c]\n"
            "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
            "aliases \\(\\*name\\) expand to over 100,000 values",
        ),
        ("a: " + "x" * 1_000_001, "over the limit of 1,000,000"),
        ("a: " + "[" * 3000, "nested too deeply to read"),
        ("a: 2024-13-45\n", "month must be in 1..12; fix that value"),
        ("a: &x {b: *x}\n", "contains itself through an alias"),
    ],
)
def test_params_that_are_not_sane_yaml_fail_in_one_line_from_every_entry_point(
    tmp_path, monkeypatch, capsys, text, message
):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=message) as err:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for argv in (["demo", "--dry-run"], ["predict", "x.png"]):
        assert main(argv) == 2
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1, out
        assert re.search(message, out.err)


def test_a_huge_value_is_cut_in_the_message(tmp_path):
    path = _write(tmp_path, lambda p: p["models"]["cnn"].update(pooling=["max"] * 50_000))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert len(message) < 1_100 and "characters cut" in message
    assert message.startswith("params.yaml: models.cnn.pooling is ['max'")
    help_line = MODEL_SETTINGS["pooling"].help
    assert message.endswith(f"expected one of ['max', 'avg', 'flatten']: {help_line}.")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tune", "cnn", "--trials", "0"], "--trials: 0 is below the minimum of 1"),
        (["tune", "cnn", "--trials", "-3"], "--trials: -3 is below the minimum of 1"),
        (["tune", "cnn", "--workers", "0"], "--workers: 0 is below the minimum of 1"),
        (["tune", "cnn", "--trials", "many"], "--trials: 'many' is not a whole number"),
        (["serve", "--port", "70000"], "--port: 70000 is outside 0-65535"),
        (["serve", "--max-megapixels", "inf"], "--max-megapixels: inf is not a finite number"),
        (["serve", "--max-body-mb", "0"], "--max-body-mb: 0 is below the minimum of 0.001"),
    ],
)
def test_cli_numbers_out_of_range_are_refused_never_taken_as_the_default(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        ([], None),
        (["--", "-n", "mine"], "mine"),
        (["-n", "mine"], "mine"),
        (["--name=mine"], "mine"),
        (["-nmine"], "mine"),
    ],
)
def test_a_demo_is_named_and_passes_dvc_arguments_on(tmp_path, monkeypatch, capsys, argv, name):
    shutil.copy(ROOT / "params.yaml", tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--dry-run", *argv]) == 0
    command = capsys.readouterr().out.split()
    assert command[:5] == ["+", "dvc", "exp", "run", "--temp"] and "--" not in command
    assert sum(arg.startswith(("-n", "--name")) for arg in command) == 1  # theirs, or ours
    if name is None:
        assert re.fullmatch(r"demo-\d{8}-\d{6}", command[command.index("-n") + 1])


def test_the_cli_finds_this_environments_dvc_without_activation(monkeypatch):
    """`.venv/bin/cxr demo` (or a benchmark run with .venv/bin/python) in a shell where the
    venv is not activated: DVC and the `python` its stages run are still this venv's."""
    import os
    import sys
    from pathlib import Path

    from cxr.cli import environment_first_on_path

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    environment_first_on_path()
    environment_first_on_path()  # once only
    venv = Path(sys.executable).parent
    assert os.environ["PATH"] == f"{venv}:/usr/bin:/bin"
    assert shutil.which("dvc") == str(venv / "dvc")
    assert Path(shutil.which("python")).parent == venv


def test_cxr_help_describes_each_subcommand_and_version_names_the_installed_one():
    """What `cxr --help` and `cxr --version` show a user (through the installed script)."""
    from importlib.metadata import version

    from tests.conftest import BIN

    shown = run_cli([str(BIN / "cxr"), "--version"])
    assert shown == f"cxr {version('cxr')}\n"
    text = run_cli([str(BIN / "cxr"), "--help"])
    _, commands = build_parser()
    assert text.startswith("usage: cxr") and "Chest radiograph classification" in text
    assert all(f"    {name}" in text for name in commands), text
    profile = run_cli([str(BIN / "cxr"), "profile", "--help"])
    assert "Arguments after `--` go to `dvc exp run`" in profile


def run_cli(command: list[str]) -> str:
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def _comment_block(text: str, key: str) -> str:
    """params.yaml's line of `key` (dotted) with the comment lines right above it."""
    lines = text.splitlines()
    *parents, last = key.split(".")
    i = 0
    for depth, part in enumerate(parents):
        i = next(k for k in range(i, len(lines)) if lines[k].startswith("  " * depth + part + ":"))
    indent = "  " * len(parents)
    i = next(k for k in range(i, len(lines)) if lines[k].startswith(f"{indent}{last}:"))
    block = [lines[i]]
    while lines[i - 1].strip().startswith("#") and lines[i - 1].startswith(indent + "#"):
        i -= 1
        block.insert(0, lines[i])
    return " ".join(line.split("#", 1)[1] if "#" in line else line for line in block)


def test_params_yaml_comments_name_what_the_table_accepts():
    """Where params.yaml's comment lists a setting's values (`a | b | c`), they are the
    table's, all of them: the comments cannot drift from what is accepted."""
    from cxr.settings import SETTINGS

    text = (ROOT / "params.yaml").read_text()
    checked = []
    for key, setting in SETTINGS.items():
        if not (setting.allowed and setting.allowed.options):
            continue
        words = {"null" if o is None else str(o).lower() for o in setting.allowed.options}
        comment = re.sub(r"\([^)]*\)", " ", _comment_block(text, key))
        listed = set()
        for a, b in re.findall(r"([\w-]+)[\s,.;:]*\|\s*(?=([\w-]+))", comment):
            listed |= {a, b}
        if listed:
            checked.append(key)
            assert listed <= words | {"N"}, (key, listed - words)
            assert words - {"null"} <= set(re.findall(r"[\w-]+", comment)), (key, words)
    assert len(checked) >= 8, checked
