"""What a training budget buys: fit seconds and validation accuracy per epoch, per model.

    python benchmarks/demo_budget.py [--models vgg16 vgg19 ...] [-S key=value ...]
        [--workdir DIR]

Trains each model as the train stage does (cxr.fit.fit, no MLflow) with params.yaml's
`demo:` overrides and then the -S ones (e.g. -S models.vgg19.epochs=4 -S
data.synthetic.findings=1.0), on the demo's phantoms (written by the download stage's code
and prepared once per setting into --workdir). Prints the machine, then one JSON line per
model: fit seconds (graph tracing included), epochs run, validation accuracy after each
epoch. How the demo's budget was chosen: docs/benchmarks.md, "The demo, budgeted by work".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from cxr import machine
from cxr.params import check_params, load_params, parse_yaml, with_overrides


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", help="default: the demo's train.models")
    parser.add_argument("-S", "--set", action="append", default=[], help="extra key=value")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cxr-demo-budget"
    )
    args = parser.parse_args()
    extra = {k: parse_yaml(v) for k, v in (a.split("=", 1) for a in args.set)}
    params = load_params()
    params = check_params(with_overrides(params, params["demo"] | extra))
    print("#", machine.header(), flush=True)

    from cxr.download import download
    from cxr.fit import accelerator_settings, fit, settings_for
    from cxr.prepare import prepare
    from cxr.prepared import split_arrays

    data = params["data"]

    def key(*parts) -> str:  # every setting the folder depends on
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]

    raw = args.workdir / f"raw-{key(data)}"
    prepared = args.workdir / f"prepared-{key(data, params['prepare'])}"
    if not raw.exists():  # the download stage's own code (written atomically)
        download(data, raw, args.workdir / f"{raw.name}.json", args.workdir / "cache")
    if not (prepared / "dataset.json").exists():
        prepare(raw, [], data["classes"], params["prepare"], prepared)
    train, val = split_arrays(prepared, "train")[:2], split_arrays(prepared, "val")[:2]
    for name in args.models or params["train"]["models"]:
        cfg, builder_cfg = settings_for(name, params)
        result = fit(
            name,
            cfg,
            builder_cfg,
            train,
            val,
            len(data["classes"]),
            accelerator_settings(cfg),
            progress=False,
        )
        accuracy = result.history["val_accuracy"]
        print(
            json.dumps(
                {
                    "model": name,
                    "fit_s": round(result.fit_seconds, 1),
                    "epochs": len(accuracy),
                    "val_accuracy": [round(a, 3) for a in accuracy],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
