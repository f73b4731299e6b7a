"""The `cxr` command. Light on imports: TensorFlow loads only in the stages that need it."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cxr.errors import CxrError
from cxr.http_server import MAX_BODY_BYTES
from cxr.params import PROFILES, check_params, load_params, with_overrides


def environment_first_on_path() -> None:
    """This interpreter's bin folder (the venv's `dvc`, `mlflow`, `python`) first on PATH, so
    that DVC, and the `python` its stages run, are this environment's also when it is not
    activated (`.venv/bin/cxr demo`, `.venv/bin/python benchmarks/...`)."""
    bin_dir = str(Path(sys.executable).parent)
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]  # "": the cwd
    if not parts or parts[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *parts])


def exp_run_command(overrides: dict) -> list[str]:
    """`dvc exp run --temp -S key=value ...` that applies `overrides` (dotted keys)."""
    command = ["dvc", "exp", "run", "--temp"]
    for key, value in overrides.items():  # every key is in params.yaml: no Hydra "+" needed
        command += ["-S", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return command


def check_data_folder() -> None:
    """`dvc exp run` fails late with "missing data 'source': data" without data/ (git keeps no
    empty folder): say how to make it, before any work."""
    if not Path("data").is_dir():
        raise CxrError(
            "data/ (your own labelled images, tracked by data.dvc) is missing: run `make data` "
            "(or `mkdir data && dvc commit -f data.dvc`) in the repository root first."
        )


def profile_command(
    name: str = "demo", archive: Path | None = None, params_path: Path = Path("params.yaml")
) -> list[str]:
    """The `dvc exp run` of a params.yaml profile's overrides (`demo:`, `real_cpu:`), reading
    the images from `archive` (a zip or folder in the Kaggle layout) when given. The params
    with the overrides applied are validated first: a bad one fails before any work."""
    params = load_params(params_path)
    overrides = dict(params[name])
    if archive is not None:
        overrides.update({"data.source": "archive", "data.archive": str(archive.resolve())})
    return checked_exp_run_command(params, overrides)


def checked_exp_run_command(params: dict, overrides: dict) -> list[str]:
    """exp_run_command(overrides), after checking params with the overrides applied (every
    model's settings against its builder included): a bad value fails before DVC starts."""
    effective = check_params(with_overrides(params, overrides))
    from cxr.models import check_settings  # imports Keras: only here, not in every stage

    for model in effective["train"]["models"]:
        check_settings(model, effective["models"][model], effective["prepare"]["image_size"])
    return exp_run_command(overrides)


def demo(args: argparse.Namespace) -> int:
    if args.archive is not None and not args.archive.exists():
        raise CxrError(f"--archive {args.archive} does not exist; pass a zip or a folder.")
    check_data_folder()
    command = profile_command(args.profile, args.archive) + list(args.dvc_args)
    given = args.dvc_args
    named = [i for i, arg in enumerate(given) if arg.startswith(("-n", "--name"))]
    if named:  # -n x, --name x, -nx, --name=x
        arg = given[named[0]]
        rest = arg.removeprefix("--name").removeprefix("-n").removeprefix("=")
        name = rest or (given[named[0] + 1] if named[0] + 1 < len(given) else "")
    else:  # a name to find it by in `dvc exp show`, not DVC's random one
        name = time.strftime(f"{args.profile.replace('_', '-')}-%Y%m%d-%H%M%S")
        command += ["-n", name]
    print("+", shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    code = subprocess.call(command)
    if code == 0:
        print(
            f"\nDone. params.yaml is unchanged; the results live in the DVC experiment {name}:\n"
            "  cxr exps                     # the params and metrics that differ, per experiment\n"
            "  dvc exp apply <name>         # bring an experiment's outputs into the workspace\n"
            "  mlflow ui                    # runs, curves and models (open 'Model training')\n"
        )
    return code


def dependency_columns(dvc_yaml: Path) -> str:
    """A regular expression matching the names of `dvc exp show`'s dependency columns (the
    hashes of every file a stage reads, from dvc.yaml): `--only-changed` keeps those of stage
    outputs that one row lacks (the workspace after `cxr demo`), dozens of them."""
    import re

    from cxr.params import read_yaml

    deps = {d for s in read_yaml(dvc_yaml)["stages"].values() for d in s.get("deps", [])}
    return (
        "^("
        + "|".join(sorted(re.escape(d).replace(r"\$\{item\.model\}", "[^/:]+") for d in deps))
        + ")$"
    )


def exps(args: argparse.Namespace) -> int:
    command = [
        "dvc",
        "exp",
        "show",
        "--only-changed",
        "--drop",
        dependency_columns(Path("dvc.yaml")),
    ]
    return subprocess.call(command + list(args.dvc_args))


def _model_uri(args: argparse.Namespace) -> str:
    """--model, or the champion of params.yaml's register.model_name; for a model in the
    MLflow store, the tracking server must answer (down: say so, not "run the pipeline")."""
    from cxr import tracking
    from cxr.register import champion_uri

    model = args.model or champion_uri(load_params()["register"]["model_name"])
    if not model.endswith(".keras"):
        import mlflow

        tracking.check_server()
        mlflow.set_tracking_uri(tracking.tracking_uri())
    return model


def _cannot_load(model: str, err: Exception) -> CxrError:
    from cxr import tracking

    return CxrError(
        f"cannot load model {model!r} from {tracking.redact(tracking.tracking_uri())}: "
        f"{tracking.scrub(str(err))}. Run the pipeline first (`make demo` or `dvc repro`), "
        "or pass --model."
    )


def predict(args: argparse.Namespace) -> int:
    """Classify image files with the registered champion (or another model URI or a local
    .keras file); print one JSON line per file. Exit status 1 if any file was refused."""
    from cxr.pyfunc_classifier import load_classifier, predict_files

    model = _model_uri(args)
    # A model file names no classes (params.yaml does); a logged model keeps its min_size.
    local = load_params() if model.endswith(".keras") else None
    try:
        if local:
            classes, min_size = local["data"]["classes"], local["prepare"]["min_size"]
            predict_fn = load_classifier(model, classes, min_size)
        else:
            predict_fn = load_classifier(model)
    except Exception as err:  # MLflow says which part of the URI it could not resolve
        raise _cannot_load(model, err) from err
    results = predict_files(predict_fn, args.images)
    for result in results:
        print(json.dumps(result))
    return 1 if any("error" in r for r in results) else 0


def serve(args: argparse.Namespace) -> int:
    """Serve a registered model over HTTP (MLflow's scoring protocol) with request caps and
    answers that do not repeat the request. The port is taken first: a busy one fails at
    once, not after the model has loaded."""
    from cxr import http_server as server

    with server.listen(args.host, args.port) as sock:
        model = _model_uri(args)
        if model.endswith(".keras"):
            raise CxrError(
                "cxr serve takes a model URI (models:/..., runs:/...), not a .keras file."
            )
        max_pixels = None if args.max_megapixels is None else int(args.max_megapixels * 1e6)
        try:
            app = server.app_for(model, int(args.max_body_mb * 2**20), max_pixels)
        except Exception as err:
            raise _cannot_load(model, err) from err
        port = sock.getsockname()[1]  # --port 0: the one the system chose
        print(f"serving {model} on http://{args.host}:{port}/invocations", flush=True)
        server.run(app, sock)
    return 0


def tune(args: argparse.Namespace) -> int:
    """Search a model's settings (params.yaml's tune.space), or train the best found."""
    from cxr import tracking

    params = load_params()
    overrides = dict(params[args.profile]) if args.profile else {}
    if args.apply:
        from cxr.tune import read_tuned

        tuned = read_tuned(Path("tuned") / f"{args.model}.yaml")
        if tuned["profile"] != args.profile:
            print(
                f"note: tuned/{args.model}.yaml was searched with profile "
                f"{tuned['profile'] or 'none'}; applying with {args.profile or 'none'}."
            )
        wins = sorted(set(overrides) & set(tuned["params"]))
        if wins:
            print(f"tuned values win over profile {args.profile} for: {', '.join(wins)}")
        overrides.update(tuned["params"])
        check_data_folder()
        command = checked_exp_run_command(params, overrides)
        command += ["-n", f"tuned-{args.model}", *args.dvc_args]
        print("+", shlex.join(command), flush=True)
        return 0 if args.dry_run else subprocess.call(command)
    from cxr.tune import tune as run_study

    tracking.check_server()
    effective = check_params(with_overrides(params, overrides))
    summary = run_study(
        effective, args.model, Path("prepared"), args.trials, args.workers, args.profile
    )
    if summary["best_trial"] is None:
        raise CxrError(f"no trial of {args.model} completed: see the lines above.")
    print(
        f"\ntune@{args.model}: best trial {summary['best_trial']}: val_loss "
        f"{summary['val_loss']:.4f}, val_accuracy {summary['val_accuracy']:.4f}; written to "
        f"tuned/{args.model}.yaml. Train it through the pipeline: cxr tune {args.model} "
        "--apply" + (f" --profile {args.profile}" if args.profile else "")
    )
    return 0


def kaggle_version(args: argparse.Namespace) -> int:
    """Print the current version number of params.yaml's data.kaggle_dataset."""
    from cxr.kaggle_client import latest_version

    print(latest_version(load_params()["data"]["kaggle_dataset"]))
    return 0


def _at_least(low: float, kind=int, high: float = math.inf):
    """An argparse type: a finite number in [low, high] (0 is refused, never read as "the
    default")."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if not low <= value <= high:
            limits = f"below the minimum of {low}" if high == math.inf else f"outside {low}-{high}"
            raise argparse.ArgumentTypeError(f"{text} is {limits}")
        return value

    return parse


DESCRIPTION = (
    "Chest radiograph classification pipeline (DVC stages, MLflow tracking): run it "
    "(demo, profile), compare experiments (exps), classify and serve with the champion "
    "(predict, serve), tune a model (tune), look up the Kaggle dataset (kaggle-version)."
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the `cxr` parser, its subcommands' parsers by name)."""
    parser = argparse.ArgumentParser(prog="cxr", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"cxr {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _pipeline_commands(sub)
    _model_commands(sub)
    _tuning_commands(sub)
    return parser, dict(sub.choices)


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("demo", "profile", "tune", "exps"):
        args.dvc_args = extra[1:] if extra[:1] == ["--"] else extra  # after --: for dvc
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except CxrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _pipeline_commands(sub) -> None:
    """demo, profile and exps: the pipeline as DVC experiments."""
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline offline on synthetic phantoms",
        epilog="Arguments after `--` go to `dvc exp run`, e.g. `cxr demo -- -n my-demo`.",
    )
    p.add_argument("--dry-run", action="store_true", help="print the dvc command only")
    p.set_defaults(func=demo, profile="demo", archive=None)
    p = sub.add_parser(
        "profile",
        help="run the whole pipeline with a params.yaml profile (e.g. real_cpu), as `cxr demo`",
        epilog="Arguments after `--` go to `dvc exp run`, e.g. "
        "`cxr profile real_cpu -- -n my-run` (experiment name).",
    )
    p.add_argument("profile", choices=PROFILES, help="the params.yaml section of overrides")
    p.add_argument("--archive", type=Path, help="read the images from this zip or folder")
    p.add_argument("--dry-run", action="store_true", help="print the dvc command only")
    # Extra `dvc exp run` arguments follow `--` (collected in main: argparse gives a
    # subcommand's trailing positionals nothing after its first positional).
    p.set_defaults(func=demo)
    p = sub.add_parser(
        "exps",
        help="the experiments side by side: the params and metrics that differ "
        "(dvc exp show --only-changed, without the columns of file hashes)",
        epilog="Arguments after `--` go to `dvc exp show`, e.g. `cxr exps -- --md`.",
    )
    p.set_defaults(func=exps)


def _model_commands(sub) -> None:
    """predict and serve: the registered champion (or another model) at work."""
    p = sub.add_parser("predict", help="classify radiograph files (PNG/JPEG)")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument(
        "--model",
        help="a model URI in the MLflow store, or a .keras file (default: the champion of "
        "params.yaml's register.model_name, models:/<model_name>@champion)",
    )
    p.set_defaults(func=predict)
    p = sub.add_parser(
        "serve", help="serve the champion over HTTP (MLflow's protocol, with request caps)"
    )
    p.add_argument("--model", help="a model URI (default: as for predict, the champion)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument(
        "-p", "--port", type=_at_least(0, int, 65535), default=5001, help="port (5001; 0: any free)"
    )
    p.add_argument(
        "--max-body-mb",
        type=_at_least(0.001, float),
        default=MAX_BODY_BYTES / 2**20,
        help=f"refuse a request body over this many MiB before reading it ({MAX_BODY_BYTES >> 20})",
    )
    p.add_argument(
        "--max-megapixels",
        type=_at_least(0.001, float),
        help="refuse a request whose images hold more than this many million pixels in all, "
        "read from their headers before decoding (default: the model's own cap, 64)",
    )
    p.set_defaults(func=serve)


def _tuning_commands(sub) -> None:
    """tune and kaggle-version."""
    p = sub.add_parser(
        "tune",
        help="search a model's settings with Optuna (params.yaml's tune:), or --apply the best",
    )
    p.add_argument("model", help="the architecture, a key of params.yaml's tune.space")
    p.add_argument(
        "--trials", type=_at_least(1), help="finished trials the study should hold (>= 1)"
    )
    p.add_argument(
        "--workers", type=_at_least(1), default=1, help="processes sharing the cores (1)"
    )
    p.add_argument("--profile", choices=PROFILES, help="search (or apply) with this profile")
    p.add_argument(
        "--apply",
        action="store_true",
        help="train tuned/<model>.yaml through the pipeline: a DVC experiment",
    )
    p.add_argument("--dry-run", action="store_true", help="with --apply: print the command")
    p.set_defaults(func=tune)
    p = sub.add_parser(
        "kaggle-version", help="print the current version number of data.kaggle_dataset"
    )
    p.set_defaults(func=kaggle_version)


def script() -> None:
    """The `cxr` command: main() with TensorFlow's known start-up notices dropped."""
    from cxr.console import quiet

    quiet()
    environment_first_on_path()
    sys.exit(main())


if __name__ == "__main__":
    script()
