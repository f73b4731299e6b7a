"""Every setting of params.yaml in one table: its key, type, allowed values and one line of help.

`cxr.params.check_params` validates params.yaml against it, its error messages quote it, and
docs/params.md is generated from it (`python -m cxr.settings > docs/params.md`; a test keeps
the page current). The table only says what is accepted: a value it accepts reaches the
stages unchanged, so no stage depends on this file in dvc.yaml, and editing a help line or a
range reruns nothing. The names the code acts on (metrics, poolings, profiles, ...) are in
cxr.vocabulary, which the stages do depend on. Checks across settings (a class named by
prepare.balance_target, a model's own keys against its builder) are
in cxr.params and cxr.models.check_settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from cxr.errors import CxrError
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

NUMBER = float  # a kind: any number, whole or not (YAML writes 1 and 1.0 alike)
NONE = type(None)


class ParamsError(CxrError):
    pass


class Rule(NamedTuple):
    """What a setting accepts: a test, the same in words, and its values where they are few
    (the words params.yaml's comments use for it: tests/test_params.py checks them)."""

    ok: Callable[[Any], bool]
    words: str
    options: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Setting:
    kind: Any  # the YAML type(s) the value must have: str, int, NUMBER, bool, list, dict, NONE
    allowed: Rule | None
    help: str
    renamed: dict[Any, str] | None = None  # an old spelling -> what to write instead

    @property
    def accepts(self) -> str:
        """What the setting accepts, in words (docs/params.md)."""
        return self.allowed.words if self.allowed else _kind_words(self.kind)


def whole(low: int, high: int | None = None) -> Rule:
    def ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= (high or v)

    return Rule(ok, f"a whole number >= {low}" + (f" and <= {high}" if high else ""))


def number(
    low: float, high: float = math.inf, open_low: bool = False, open_high: bool = False
) -> Rule:
    def ok(v):
        if not isinstance(v, int | float) or isinstance(v, bool):
            return False
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    if high == math.inf:
        return Rule(ok, f"a number {'>' if open_low else '>='} {low}")
    return Rule(
        ok, f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    )


def choice(options: tuple[str, ...]) -> Rule:
    return Rule(lambda v: v in options, f"one of {list(options)}", tuple(options))


def optional(rule: Rule) -> Rule:
    options = (None, *rule.options) if rule.options else None
    return Rule(lambda v: v is None or rule.ok(v), f"null or {rule.words}", options)


def auto_or(rule: Rule) -> Rule:
    return Rule(lambda v: v == "auto" or rule.ok(v), f"auto or {rule.words}")


TRI_STATE = Rule(lambda v: v in ("auto", True, False), "auto, true or false", ("auto", True, False))


def whole_list(low: int) -> Rule:
    one = whole(low)
    return Rule(
        lambda v: isinstance(v, list) and bool(v) and all(one.ok(f) for f in v),
        f"a non-empty list of whole numbers >= {low}",
    )


def _s(kind, allowed=None, help="", renamed=None):
    return Setting(kind, allowed, help, renamed)


def _tri_state(help: str) -> Setting:
    return _s((str, bool), TRI_STATE, help, {"on": "true", "off": "false"})


# Augmentation of the training batches (train.augment.<key>, and a model's own augment).
_AUGMENT = {
    "rotation": _s(NUMBER, number(0, 0.5), "random rotation, a fraction of a full turn"),
    "shift": _s(NUMBER, number(0, 0.5), "random shift, a fraction of the image side"),
    "zoom": _s(NUMBER, number(0, 0.9), "random zoom, a fraction"),
    "brightness": _s(NUMBER, number(0, 1), "random brightness change, a fraction"),
    "contrast": _s(NUMBER, number(0, 1), "random contrast change, a fraction"),
    "flip": _s(bool, None, "left-right flips (the heart is on one side: false)"),
}

SETTINGS: dict[str, Setting] = {
    "data.source": _s(
        str,
        choice(SOURCES),
        "where the images come from: the Kaggle API, data.archive, or built-in phantoms",
    ),
    "data.kaggle_dataset": _s(str, None, "the Kaggle dataset (owner/name)"),
    "data.kaggle_version": _s((int, NONE), optional(whole(1)), "its version; null = the latest"),
    "data.archive": _s(
        (str, NONE), None, "with data.source archive: a zip or folder in the Kaggle layout"
    ),
    "data.topup": _s(
        (str, NONE),
        optional(choice(("viral", "all"))),
        "top-up of the pneumonia class from the paediatric set: null, viral films, or all",
    ),
    "data.topup_dataset": _s(str, None, "the top-up's Kaggle dataset (owner/name)"),
    "data.topup_version": _s(
        (int, NONE), optional(whole(1)), "the top-up's version; null = the latest"
    ),
    "data.topup_archive": _s(
        (str, NONE), None, "with data.source archive: a zip or folder holding chest_xray/"
    ),
    "data.synthetic.per_class": _s(int, whole(1), "phantoms per class"),
    "data.synthetic.image_size": _s(int, whole(16), "the phantoms' side in pixels"),
    "data.synthetic.seed": _s(int, None, "the phantoms' random seed"),
    "data.synthetic.findings": _s(
        NUMBER, number(0, 10, open_low=True), "the findings' contrast, times this"
    ),
    "data.synthetic.shortcut": _s(
        str, choice(SHORTCUTS), "marker: a class-specific marker outside the lungs (a test)"
    ),
    "data.classes": _s(
        list, None, "the classes to keep, from covid, lung_opacity, normal, pneumonia"
    ),
    "prepare.image_size": _s(int, whole(16), "the prepared images' side in pixels"),
    "prepare.min_size": _s(int, whole(1), "images smaller than this on either side are rejected"),
    "prepare.near_duplicate_bits": _s(
        int, whole(0, 64), "near duplicates: perceptual hashes within this many bits of 64"
    ),
    "prepare.near_duplicate_mad": _s(
        NUMBER, number(0, 255), "... and 32x32 thumbnails within this mean grey difference"
    ),
    "prepare.balance": _s(
        str,
        choice(BALANCE),
        "undersample to balance_target (pneumonia topped up with data.topup), or none",
        {"top-up": "undersample (the top-up is data.topup alone)"},
    ),
    "prepare.balance_target": _s(
        (str, int), None, "the class whose count the others are cut to, or a count"
    ),
    "prepare.val_fraction": _s(NUMBER, number(0, 1, True, True), "the validation split's share"),
    "prepare.test_fraction": _s(NUMBER, number(0, 1, True, True), "the test split's share"),
    "prepare.seed": _s(int, None, "the split's random seed"),
    "train.models": _s(list, None, "the architectures to train (keys of models)"),
    "train.seed": _s(int, None, "weights, shuffling and augmentation seed"),
    "train.batch_size": _s(int, whole(1), "images per batch"),
    "train.epochs": _s(int, whole(1), "the most epochs (early stopping may end sooner)"),
    "train.early_stopping_patience": _s(
        int, whole(1), "epochs without a better validation loss before stopping"
    ),
    "train.learning_rate": _s(NUMBER, number(0, 1, open_low=True), "Adam's learning rate"),
    "train.schedule": _s(str, choice(SCHEDULES), "the learning rate: constant or cosine decay"),
    "train.imbalance": _s(
        str,
        choice(("class_weight", "oversample", "none")),
        "class imbalance left in the training split: loss weights, resampling or none",
    ),
    **{f"train.augment.{k}": v for k, v in _AUGMENT.items()},
    "train.mixed_precision": _tri_state("bf16/fp16 compute: auto = on with a GPU"),
    "train.jit_compile": _tri_state("XLA: auto = on with a GPU, and on JAX"),
    "train.deterministic": _tri_state("deterministic ops: auto = on without a GPU"),
    "train.steps_per_execution": _s(
        (str, int), auto_or(whole(1)), "batches per host round trip: auto = 1 on CPU, 32 on GPU"
    ),
    "train.threads": _s(
        (str, int), auto_or(whole(1)), "TensorFlow's CPU threads: auto = the usable cores"
    ),
    "train.checkpoint_seconds": _s(
        NUMBER, number(0), "seconds between checkpoints, at an epoch's end (0: every epoch)"
    ),
    "train.lung_focus": _s(
        str, choice(LUNG_FOCUS), "template: show every model only the lung template's region"
    ),
    "train.lung_focus_margin": _s(
        NUMBER, number(-0.1, 0.2), "the focus region: the template grown by this share of the side"
    ),
    "models": _s(dict, None, "each architecture's builder and own training settings (below)"),
    "evaluate.batch_size": _s(int, whole(1), "images per prediction batch"),
    "evaluate.bootstrap": _s(int, whole(1), "bootstrap resamples for the intervals"),
    "evaluate.ci_level": _s(NUMBER, number(0, 1, open_low=True), "the intervals' level"),
    "evaluate.calibration_bins": _s(int, whole(1), "confidence bins for ECE and the diagram"),
    "evaluate.gradcam_per_class": _s(int, whole(0), "test images per class shown with Grad-CAM"),
    "evaluate.seed": _s(int, None, "the bootstrap's seed"),
    "compare.metric": _s(
        str, choice(METRICS + LUNG_METRICS), "the validation metric the champion is chosen by"
    ),
    "register.model_name": _s(str, None, "the registered model the champion is an alias of"),
    "register.force": _s(bool, None, "register even when the current champion scores higher"),
    "mlflow.experiment": _s(str, None, "the MLflow experiment of every run"),
    "tune.trials": _s(int, whole(1), "finished trials a study holds"),
    "tune.epochs": _s(int, whole(1), "each trial's budget in epochs"),
    "tune.pruner": _s(str, choice(PRUNERS), "stops poor trials early, on validation loss"),
    "tune.seed": _s(int, None, "the TPE sampler's seed"),
    "tune.storage": _s((str, NONE), None, "null: tuning/<model>.journal; or a database URL"),
    "tune.space": _s(dict, None, "per model: each searched key's choices or {low, high, log}"),
    "demo": _s(dict, None, "the offline demo's overrides (`cxr demo`, `make demo`)"),
    "real_cpu": _s(dict, None, "overrides for real radiographs on a CPU (`cxr profile real_cpu`)"),
}

# models.<name>.<key>: which keys each builder takes is its signature's (cxr.models).
MODEL_SETTINGS: dict[str, Setting] = {
    "weights": _s((str, NONE), None, "imagenet, none (from scratch) or a base weights file"),
    "fine_tune_layers": _s(int, whole(0), "with loaded weights: the base's top layers trained"),
    "dense_units": _s(int, whole(1), "the dense head's width"),
    "dropout": _s(NUMBER, number(0, 1, open_high=True), "the head's dropout"),
    "bn_momentum": _s(NUMBER, number(0, 1), "the batch norms' momentum"),
    "pooling": _s(str, choice(POOLINGS), "the last feature map's reduction"),
    "filters": _s(list, whole_list(1), "the CNN's filters per conv block"),
    "input_size": _s((int, NONE), optional(whole(16)), "resize inside the model; null: prepare's"),
    "lung_focus": _s((str, NONE), optional(choice(LUNG_FOCUS)), "this model's own; null: train's"),
    "lung_focus_margin": _s(
        (NUMBER, NONE), optional(number(-0.1, 0.2)), "this model's own; null: train's"
    ),
    "learning_rate": _s((NUMBER, NONE), None, "this model's own; null: train's"),
    "epochs": _s((int, NONE), None, "this model's own; null: train's"),
    "batch_size": _s((int, NONE), None, "this model's own; null: train's"),
    "schedule": _s((str, NONE), None, "this model's own; null: train's"),
    "augment": _s((dict, NONE), None, "train.augment's keys, this model's own; null: train's"),
}


def schema() -> dict[str, Any]:
    """The nested {section: {key: kind}} of every setting (cxr.params checks against it)."""
    tree: dict[str, Any] = {}
    for key, setting in SETTINGS.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = setting.kind
    return tree


def has_kind(value: Any, kind: Any) -> bool:
    """Whether `value` has one of the YAML kinds `kind` names (true and false are not numbers)."""
    for k in kind if isinstance(kind, tuple) else (kind,):
        if k in (int, NUMBER):
            if isinstance(value, int if k is int else int | float) and not isinstance(value, bool):
                return True
        elif isinstance(value, k):
            return True
    return False


def check(where: str, value: Any, setting: Setting) -> None:
    """Refuse `value` of `where` (a dotted key) in one line when it has not the setting's kind
    or its rule refuses it: the key, the value, what it accepts (the new spelling of an old
    one) and its help."""
    if has_kind(value, setting.kind) and (setting.allowed is None or setting.allowed.ok(value)):
        return
    new = (setting.renamed or {}).get(str(value).lower())
    hint = f" (write {new} for {value!r})" if new else ""
    raise ParamsError(
        f"params.yaml: {where} is {value!r}; expected {setting.accepts}{hint}: {setting.help}."
    )


def _cell(value: Any) -> str:
    import json

    text = "null" if value is None else json.dumps(value) if not isinstance(value, str) else value
    return f"`{text}`".replace("|", "\\|")


def markdown(params: dict[str, Any]) -> str:
    """docs/params.md: every setting with params.yaml's value, what it accepts and its help."""
    from cxr.params import flatten

    flat = flatten({k: v for k, v in params.items() if k not in ("models", "tune", *PROFILES)})
    flat |= {f"tune.{k}": v for k, v in params["tune"].items() if k != "space"}
    lines = [
        "# Settings",
        "",
        "Every key of `params.yaml`, its value there, what it accepts and what it does.",
        "Generated from `src/cxr/settings.py` by `python -m cxr.settings > docs/params.md`:",
        "edit the table there, not this page. Set one for a run with `dvc exp run -S key=value`.",
        "",
        "| key | params.yaml | accepts | what it does |",
        "|---|---|---|---|",
    ]
    for key, s in SETTINGS.items():
        value = _cell(flat[key]) if key in flat else ""
        lines.append(f"| `{key}` | {value} | {s.accepts} | {s.help} |")
    lines += [
        "",
        "## A model's settings (`models.<name>.<key>`)",
        "",
        "Which keys each architecture takes is its builder's (`src/cxr/models.py`); values:",
        "",
        "| key | accepts | what it does |",
        "|---|---|---|",
    ]
    for key, s in MODEL_SETTINGS.items():
        lines.append(f"| `{key}` | {s.accepts} | {s.help} |")
    return "\n".join(lines) + "\n"


def _kind_words(kind: Any) -> str:
    names = {str: "text", int: "a whole number", NUMBER: "a number", bool: "true or false"}
    names |= {list: "a list", dict: "a mapping", NONE: "null"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names[k] for k in kinds)


if __name__ == "__main__":
    from cxr.params import load_params

    print(markdown(load_params()), end="")
