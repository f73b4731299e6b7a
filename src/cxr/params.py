"""The params schema: one place that says which keys params.yaml has and what they mean.

Stages read their own section through `load_params`, which rejects unknown or missing keys
with a message naming them, so a typo in params.yaml fails before any work is done.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError

from cxr import settings
from cxr.classes import check_labels
from cxr.settings import ParamsError
from cxr.vocabulary import (
    BALANCE,
    LUNG_FOCUS,
    LUNG_METRICS,
    METRICS,
    POOLINGS,
    PROFILES,
    PRUNERS,
    SCHEDULES,
    SHORTCUTS,
    SOURCES,
)

# The vocabularies (cxr.vocabulary) are re-exported: the code imports them from here.
__all__ = [
    "BALANCE",
    "LUNG_FOCUS",
    "LUNG_METRICS",
    "METRICS",
    "POOLINGS",
    "PROFILES",
    "PRUNERS",
    "SCHEDULES",
    "SHORTCUTS",
    "SOURCES",
    "ParamsError",
    "check_params",
    "flatten",
    "load_params",
    "parse_yaml",
    "read_yaml",
    "stage_params",
    "with_overrides",
]


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
    else:  # a setting: its kind and its rule, in one line (cxr.settings)
        settings.check(where, value, settings.SETTINGS[where])


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


def parse_yaml(text: str) -> Any:
    """YAML text as plain data, read as DVC reads params.yaml (YAML 1.2, ruamel's safe loader):
    what `dvc exp run -S train.mixed_precision=on` writes is the text 'on', not true (YAML 1.1,
    PyYAML); 1e-3 is a number; a key written twice is an error."""
    return YAML(typ="safe").load(text)


def read_yaml(path: str | Path) -> Any:
    """A YAML file as plain data (parse_yaml), refused in one line with its file, line and
    column when it is not YAML, over MAX_YAML_BYTES, or expanding to over MAX_YAML_VALUES
    values."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the repository root.")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ParamsError(
            f"{path} is {path.stat().st_size:,} bytes, over the limit of {MAX_YAML_BYTES:,}; "
            "is it the right file?"
        )
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
        values = _values(data, {})
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8.") from err
    except YAMLError as err:
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
    """Validate params: every key's type and allowed values (the table, cxr.settings), then
    what one setting implies for another; return them."""
    _check(params, settings.schema(), "")
    data, prep, train = params["data"], params["prepare"], params["train"]
    if data["source"] == "archive" and not data["archive"]:
        raise ParamsError(
            "params.yaml: data.source is 'archive' but data.archive is empty; "
            "set it to a zip file or folder in the Kaggle layout."
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
    if prep["val_fraction"] + prep["test_fraction"] >= 1:
        raise ParamsError(
            "params.yaml: prepare.val_fraction and prepare.test_fraction must be "
            "in (0, 1) and sum to less than 1."
        )
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
    for model in params["train"]["models"]:
        if model not in params["models"]:
            raise ParamsError(
                f"params.yaml: train.models lists {model!r} but models.{model} has no settings; "
                f"add a 'models.{model}' section (known: {sorted(params['models'])})."
            )
    for model, own in params["models"].items():
        _check_model_training_keys(model, own, train)
    for model in set(params["tune"]["space"]) - set(params["models"]):
        raise ParamsError(
            f"params.yaml: tune.space.{model} names no model of models "
            f"(known: {sorted(params['models'])})."
        )
    return params


def _check_model_training_keys(model: str, own: Any, train: dict[str, Any]) -> None:
    """A model's own settings (models.<model>.<key>) obey the table's rules for them, and its
    own training settings (schedule, augment.<key>, ...) train's."""
    if not isinstance(own, dict):
        raise ParamsError(f"params.yaml: 'models.{model}' must be a mapping, got {own!r}.")
    augment = own.get("augment") or {}
    if not isinstance(augment, dict) or set(augment) - set(train["augment"]):
        raise ParamsError(
            f"params.yaml: models.{model}.augment is {augment!r}; expected a mapping of some "
            f"of {sorted(train['augment'])}."
        )
    for key, value in own.items():
        if key in settings.MODEL_SETTINGS:
            settings.check(f"models.{model}.{key}", value, settings.MODEL_SETTINGS[key])
    mine = {k: v for k, v in own.items() if k in train and k != "augment" and v is not None}
    mine |= {f"augment.{k}": v for k, v in augment.items() if v is not None}
    for key, value in mine.items():
        settings.check(f"models.{model}.{key}", value, settings.SETTINGS[f"train.{key}"])


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
