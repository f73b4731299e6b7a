"""The params schema: one place that says which keys params.yaml has and what they mean.

Stages read their own section through `load_params`, which rejects unknown or missing keys
with a message naming them, so a typo in params.yaml fails before any work is done.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from cxr.classes import check_labels
from cxr.errors import CxrError

SOURCES = ("kaggle", "archive", "synthetic")
BALANCE = ("undersample", "top-up", "none")
SCHEDULES = ("constant", "cosine")
PRUNERS = ("median", "hyperband", "none")
# The headline test metrics (compare.metric's choices; cxr.metrics names them for reports).
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro")
# The shortcut audit's scores on the test images with only the lungs visible (cxr.evaluate):
# compare.metric may pick the champion by one of them instead.
LUNG_METRICS = ("lungs_only_macro_f1", "lungs_only_accuracy")
LUNG_FOCUS = ("none", "template")
SHORTCUTS = ("none", "marker")
POOLINGS = ("max", "avg", "flatten")  # the names of cxr.models.POOLINGS' layers


def _whole(low: int, high: int | None = None):
    def ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= (high or v)

    return ok, f"a whole number >= {low}" + (f" and <= {high}" if high else "")


def _number(low: float, high: float, open_low: bool = False, open_high: bool = False):
    def ok(v):
        if not isinstance(v, int | float) or isinstance(v, bool):
            return False
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    return ok, f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def _choice(options: tuple[str, ...]):
    return (lambda v: v in options), f"one of {list(options)}"


def _optional(rule):
    ok, expected = rule
    return (lambda v: v is None or ok(v)), f"null or {expected}"


def _whole_list(low: int):
    ok, expected = _whole(low)
    return (lambda v: isinstance(v, list) and bool(v) and all(ok(f) for f in v)), (
        f"a non-empty list of whole numbers >= {low}"
    )


# Ranges of numeric keys: a value outside fails before any work, naming key, value and range.
RANGES: dict[str, tuple[Any, str]] = {
    "data.synthetic.per_class": _whole(1),
    "data.synthetic.image_size": _whole(16),
    "data.synthetic.findings": _number(0, 10, open_low=True),
    "prepare.image_size": _whole(16),
    "prepare.min_size": _whole(1),
    "prepare.near_duplicate_bits": _whole(0, 64),
    "prepare.near_duplicate_mad": _number(0, 255),
    "train.batch_size": _whole(1),
    "train.epochs": _whole(1),
    "train.early_stopping_patience": _whole(1),
    "train.learning_rate": _number(0, 1, open_low=True),
    "train.augment.rotation": _number(0, 0.5),
    "train.augment.shift": _number(0, 0.5),
    "train.augment.zoom": _number(0, 0.9),
    "train.augment.brightness": _number(0, 1),
    "train.augment.contrast": _number(0, 1),
    "train.lung_focus_margin": _number(-0.1, 0.2),
    "evaluate.batch_size": _whole(1),
    "evaluate.bootstrap": _whole(1),
    "evaluate.ci_level": _number(0, 1, open_low=True),
    "evaluate.calibration_bins": _whole(1),
    "evaluate.gradcam_per_class": _whole(0),
    "tune.trials": _whole(1),
    "tune.epochs": _whole(1),
}

# Values of the model builders' settings (models.<name>.<key>; which keys each builder takes,
# and what depends on the architecture, cxr.models.check_settings checks): checked with the
# rest, so a bad value fails in the first stage, not in train after download and prepare.
MODEL_RANGES: dict[str, tuple[Any, str]] = {
    "fine_tune_layers": _whole(0),
    "dense_units": _whole(1),
    "dropout": _number(0, 1, open_high=True),
    "bn_momentum": _number(0, 1),
    "pooling": _choice(POOLINGS),
    "filters": _whole_list(1),
    "input_size": _optional(_whole(16)),
    "lung_focus": _choice(LUNG_FOCUS),
    "lung_focus_margin": _number(-0.1, 0.2),
}

# Required keys of each section, with the type they must have (nested dicts are checked too).
SCHEMA: dict[str, Any] = {
    "data": {
        "source": str,
        "kaggle_dataset": str,
        "kaggle_version": (int, type(None)),
        "archive": (str, type(None)),
        "topup": (str, type(None)),
        "topup_dataset": str,
        "topup_version": (int, type(None)),
        "topup_archive": (str, type(None)),
        "synthetic": {
            "per_class": int,
            "image_size": int,
            "seed": int,
            "findings": float,
            "shortcut": str,
        },
        "classes": list,
    },
    "prepare": {
        "image_size": int,
        "min_size": int,
        "near_duplicate_bits": int,
        "near_duplicate_mad": float,
        "balance": str,
        "balance_target": (str, int),
        "val_fraction": float,
        "test_fraction": float,
        "seed": int,
    },
    "train": {
        "models": list,
        "seed": int,
        "batch_size": int,
        "epochs": int,
        "early_stopping_patience": int,
        "learning_rate": float,
        "schedule": str,
        "imbalance": str,
        "augment": {
            "rotation": float,
            "shift": float,
            "zoom": float,
            "brightness": float,
            "contrast": float,
            "flip": bool,
        },
        "mixed_precision": (str, bool),
        "jit_compile": (str, bool),
        "deterministic": (str, bool),
        "steps_per_execution": (str, int),
        "threads": (str, int),
        "checkpoint_seconds": (int, float),
        "lung_focus": str,
        "lung_focus_margin": (int, float),
    },
    "models": dict,
    "evaluate": {
        "batch_size": int,
        "bootstrap": int,
        "ci_level": float,
        "calibration_bins": int,
        "gradcam_per_class": int,
        "seed": int,
    },
    "compare": {"metric": str},
    "register": {"model_name": str, "force": bool},
    "mlflow": {"experiment": str},
    "tune": {
        "trials": int,
        "epochs": int,
        "pruner": str,
        "seed": int,
        "storage": (str, type(None)),
        "space": dict,
    },
    # Profiles: dotted-key overrides that `cxr demo` / `cxr profile NAME` pass to
    # `dvc exp run --temp -S`, leaving this file as it is.
    "demo": dict,
    "real_cpu": dict,
}
PROFILES = ("demo", "real_cpu")


class ParamsError(CxrError):
    pass


def _check(value: Any, schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ParamsError(f"params.yaml: '{where}' must be a mapping, got {value!r}.")
        missing = sorted(set(schema) - set(value))
        unknown = sorted(set(value) - set(schema))
        if missing or unknown:
            raise ParamsError(
                f"params.yaml: section '{where}' "
                + (f"is missing {missing}" if missing else "")
                + (" and " if missing and unknown else "")
                + (f"has unknown key(s) {unknown}" if unknown else "")
                + f"; expected keys: {sorted(schema)}."
            )
        for key, sub in schema.items():
            _check(value[key], sub, f"{where}.{key}" if where else key)
    elif schema is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ParamsError(f"params.yaml: '{where}' must be a number, got {value!r}.")
    elif not isinstance(value, schema) or (schema is int and isinstance(value, bool)):
        raise ParamsError(
            f"params.yaml: '{where}' must be of type {getattr(schema, '__name__', schema)}, "
            f"got {value!r}."
        )


MAX_YAML_BYTES = 1_000_000  # params.yaml is about 10 kB; dvc.yaml about 8 kB
MAX_YAML_VALUES = 100_000  # values once YAML aliases are expanded (an alias bomb: billions)


def _values(node: Any, sizes: dict[int, int | None]) -> int:
    """How many values `node` holds with aliases expanded; a shared node's size is computed
    once (linear in the file, not in the expansion). None marks a node being counted: met
    again inside itself, it is an alias of itself (`&a [*a]`), endless once expanded."""
    if id(node) in sizes:
        if sizes[id(node)] is None:
            raise ValueError("a value contains itself through an alias (&name ... *name)")
        return sizes[id(node)]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    sizes[id(node)] = None
    sizes[id(node)] = total = 1 + sum(_values(child, sizes) for child in children)
    return total


def read_yaml(path: str | Path) -> Any:
    """A YAML file as plain data, refused in one line with its file, line and column when it
    is not YAML, over MAX_YAML_BYTES, or expanding to over MAX_YAML_VALUES values."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the repository root.")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ParamsError(
            f"{path} is {path.stat().st_size:,} bytes, over the limit of {MAX_YAML_BYTES:,}; "
            "is it the right file?"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        values = _values(data, {})
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8.") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ParamsError(f"{where}: not valid YAML ({problem[:200]}); fix it there.") from err
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to read; is it the right file?") from None
    except (ValueError, TypeError) as err:  # a value YAML cannot build (a date 2024-13-45)
        raise ParamsError(f"{path}: {str(err)[:200]}; fix that value.") from err
    if values > MAX_YAML_VALUES:
        raise ParamsError(
            f"{path}: its YAML aliases (*name) expand to over {MAX_YAML_VALUES:,} values; "
            "write the values out instead."
        )
    return data


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate params.yaml; return it as a plain dict."""
    return check_params(read_yaml(path) or {})


def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """Validate params (types, choices, ranges, cross-references); return them."""
    _check(params, SCHEMA, "")
    data = params["data"]
    if data["source"] not in SOURCES:
        raise ParamsError(
            f"params.yaml: data.source is {data['source']!r}; expected one of {list(SOURCES)}."
        )
    if data["source"] == "archive" and not data["archive"]:
        raise ParamsError(
            "params.yaml: data.source is 'archive' but data.archive is empty; "
            "set it to a zip file or folder in the Kaggle layout."
        )
    if data["topup"] not in (None, "viral", "all"):
        raise ParamsError(
            f"params.yaml: data.topup is {data['topup']!r}; expected null (no top-up), "
            "'viral' (viral pneumonia films only) or 'all' (viral and bacterial, as the study)."
        )
    if data["synthetic"]["shortcut"] not in SHORTCUTS:
        raise ParamsError(
            f"params.yaml: data.synthetic.shortcut is {data['synthetic']['shortcut']!r}; "
            f"expected one of {list(SHORTCUTS)}."
        )
    if data["synthetic"]["findings"] != 1 and data["topup"] and data["source"] == "synthetic":
        raise ParamsError(
            "params.yaml: data.synthetic.findings scales the database's phantoms only, not "
            "the top-up set's (whose duplicates of them would then differ): set data.topup "
            "to null with it."
        )
    if data["synthetic"]["shortcut"] != "none" and data["topup"]:
        raise ParamsError(
            "params.yaml: data.synthetic.shortcut plants a marker in the database's phantoms "
            "only, not in the top-up set's: set data.topup to null with it."
        )
    data["classes"] = check_labels(data["classes"])
    prep = params["prepare"]
    if not (
        0 < prep["val_fraction"] < 1
        and 0 < prep["test_fraction"] < 1
        and prep["val_fraction"] + prep["test_fraction"] < 1
    ):
        raise ParamsError(
            "params.yaml: prepare.val_fraction and prepare.test_fraction must be "
            "in (0, 1) and sum to less than 1."
        )
    if prep["balance"] not in BALANCE:
        raise ParamsError(
            f"params.yaml: prepare.balance is {prep['balance']!r}; expected one of {list(BALANCE)}."
        )
    if data["topup"] and prep["balance"] != "top-up":  # fetched, then silently unused
        raise ParamsError(
            f"params.yaml: data.topup is {data['topup']!r} but prepare.balance is "
            f"{prep['balance']!r}, which does not use the top-up set: set prepare.balance to "
            "top-up, or data.topup to null."
        )
    train = params["train"]
    for key, allowed in (
        ("schedule", SCHEDULES),
        ("imbalance", ("class_weight", "oversample", "none")),
        ("lung_focus", LUNG_FOCUS),
    ):
        if train[key] not in allowed:
            raise ParamsError(
                f"params.yaml: train.{key} is {train[key]!r}; expected one of {list(allowed)}."
            )
    for key in ("mixed_precision", "jit_compile", "deterministic"):  # one vocabulary
        value = train[key]
        if value not in ("auto", True, False):
            old = {"on": "true", "off": "false"}.get(str(value).lower())
            raise ParamsError(
                f"params.yaml: train.{key} is {value!r}; expected auto, true or false"
                + (f" (write {old} for {value!r})." if old else ".")
            )
    if train["checkpoint_seconds"] < 0:
        raise ParamsError("params.yaml: train.checkpoint_seconds must be 0 (every epoch) or more.")
    for key in ("steps_per_execution", "threads"):
        if train[key] != "auto" and not (isinstance(train[key], int) and train[key] >= 1):
            raise ParamsError(
                f"params.yaml: train.{key} is {train[key]!r}; expected auto or a whole number >= 1."
            )
    flat = flatten({k: v for k, v in params.items() if k not in PROFILES})
    for key, (ok, expected) in RANGES.items():
        if not ok(flat[key]):
            raise ParamsError(f"params.yaml: {key} is {flat[key]!r}; expected {expected}.")
    target = prep["balance_target"]
    if isinstance(target, str) and target not in data["classes"]:
        raise ParamsError(
            f"params.yaml: prepare.balance_target is {target!r}; expected one of data.classes "
            f"{data['classes']} (undersample to its count) or a whole number of images >= 1."
        )
    if isinstance(target, int) and target < 1:
        raise ParamsError(
            f"params.yaml: prepare.balance_target is {target}; expected a whole number of "
            "images >= 1 or a class name."
        )
    if params["compare"]["metric"] not in METRICS + LUNG_METRICS:
        raise ParamsError(
            f"params.yaml: compare.metric is {params['compare']['metric']!r}; expected one of "
            f"{list(METRICS + LUNG_METRICS)}."
        )
    for model in params["train"]["models"]:
        if model not in params["models"]:
            raise ParamsError(
                f"params.yaml: train.models lists {model!r} but models.{model} has no settings; "
                f"add a 'models.{model}' section (known: {sorted(params['models'])})."
            )
    for model, settings in params["models"].items():
        _check_model_training_keys(model, settings, train)
    tune = params["tune"]
    if tune["pruner"] not in PRUNERS:
        raise ParamsError(
            f"params.yaml: tune.pruner is {tune['pruner']!r}; expected one of {list(PRUNERS)}."
        )
    for model in set(tune["space"]) - set(params["models"]):
        raise ParamsError(
            f"params.yaml: tune.space.{model} names no model of models "
            f"(known: {sorted(params['models'])})."
        )
    return params


def _check_model_training_keys(model: str, settings: Any, train: dict[str, Any]) -> None:
    """A model's own training settings (models.<model>.schedule, .augment.<key>, ...) obey
    train's rules."""
    if not isinstance(settings, dict):
        raise ParamsError(f"params.yaml: 'models.{model}' must be a mapping, got {settings!r}.")
    own = {k: v for k, v in settings.items() if k in train and k != "augment" and v is not None}
    merged = {**train, **own}  # a null training key is train's
    augment = settings.get("augment") or {}
    if not isinstance(augment, dict) or set(augment) - set(train["augment"]):
        raise ParamsError(
            f"params.yaml: models.{model}.augment is {augment!r}; expected a mapping of some "
            f"of {sorted(train['augment'])}."
        )
    for key, (ok, expected) in MODEL_RANGES.items():
        if key in settings and not ok(settings[key]):
            raise ParamsError(
                f"params.yaml: models.{model}.{key} is {settings[key]!r}; expected {expected}."
            )
    merged["augment"] = {**train["augment"], **augment}
    if merged["schedule"] not in SCHEDULES:
        raise ParamsError(
            f"params.yaml: models.{model}.schedule is {merged['schedule']!r}; expected one of "
            f"{list(SCHEDULES)}."
        )
    flat = flatten({"train": merged})
    for key, (ok, expected) in RANGES.items():
        if key.startswith("train.") and not ok(flat[key]):
            own = f"models.{model}.{key.removeprefix('train.')}"
            raise ParamsError(f"params.yaml: {own} is {flat[key]!r}; expected {expected}.")


class StageParams(dict):
    """A stage's view of params.yaml: reading a key that the stage did not declare fails."""

    def __init__(self, stage: str, where: str = ""):
        super().__init__()
        self.stage, self.where = stage, where

    def child(self, key: str) -> StageParams:
        if key not in self:
            self[key] = StageParams(self.stage, f"{self.where}{key}.")
        return self[key]

    def __missing__(self, key: str):
        raise ParamsError(
            f"stage '{self.stage}' reads params.yaml's '{self.where}{key}', which its params "
            "in dvc.yaml do not list: add it there, so that changing it reruns the stage."
        )


def stage_params(
    stage: str,
    item: dict[str, str] | None = None,
    untracked: tuple[str, ...] = (),
    path: str | Path = "params.yaml",
) -> StageParams:
    """The validated params that stage `stage` declares in dvc.yaml (beside `path`; for a
    matrix stage, `${item.<key>}` filled in from `item`), and nothing else: a stage that
    reads an undeclared param fails at once instead of silently not rerunning when it
    changes. `untracked`: keys the stage reads that do not change its results, so changing
    them reruns nothing (DVC does not see them)."""
    params = load_params(path)
    stages = read_yaml(Path(path).parent / "dvc.yaml")["stages"]
    view = StageParams(stage)
    for key in [*stages[stage].get("params", []), *untracked]:
        for name, value in (item or {}).items():
            key = key.replace(f"${{item.{name}}}", value)
        *parents, last = key.split(".")
        source, target = params, view
        for part in parents:
            source, target = source[part], target.child(part)
        target[last] = copy.deepcopy(source[last])
    return view


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `params` with dotted-key `overrides` applied ({'a.b': 1} sets a -> b)."""
    result = copy.deepcopy(params)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return result


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the key form DVC's `-S` and MLflow params use."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
