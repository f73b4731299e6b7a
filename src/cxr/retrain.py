"""What `.ci/retrain` asks before it retrains: are the secrets and plugins there, which Kaggle
version to train on, and has anything changed since the dvc.lock in git.

`python -m cxr.retrain check` fails in one line for a missing secret, a tracking store that
would die with the runner, or a remote whose DVC plugin is not installed; `version` prints
the Kaggle version to train on (nothing for other sources; `--topup`: the top-up set's);
`unchanged [--kaggle-version N] [--topup-version M]` exits 0 when dvc.lock already holds
these versions, code, data and params (and says so), 3 (CHANGED) with the list of what
changed; any other status is a failure."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from cxr.errors import CxrError
from cxr.params import load_params
from cxr.repo import repo_root

# DVC remote URL scheme -> (the module DVC needs, the extra that installs it).
REMOTE_PLUGINS = {
    "s3": ("dvc_s3", "remote-s3"),
    "gs": ("dvc_gs", "remote-gs"),
    "gcs": ("dvc_gs", "remote-gs"),
    "azure": ("dvc_azure", "remote-azure"),
}
# Tracking stores that live on the runner: its registry (and the champion) would be lost.
LOCAL_STORES = ("", "file", "sqlite")
SECRETS_PAGE = "the repository's Settings > Secrets and variables > Actions"
CHANGED = 3  # `unchanged`'s exit status when something changed (1 is Python's for a crash)


def check(env: Mapping[str, str], params: Mapping[str, Any]) -> None:
    """Every secret and plugin the retraining needs, before any work."""
    remote = env.get("DVC_REMOTE_URL", "")
    if not remote:
        raise CxrError(
            f"DVC_REMOTE_URL is not set: add the secret in {SECRETS_PAGE} (for example "
            "s3://bucket/cxr), so the data, models and run cache outlive the runner."
        )
    scheme = urlsplit(remote).scheme
    module, extra = REMOTE_PLUGINS.get(scheme, (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise CxrError(
            f"the DVC remote is a {scheme}:// store but DVC's plugin for it is not installed: "
            f"make install EXTRAS=dev,{extra} (the workflow installs remote-s3, remote-gs and "
            "remote-azure)."
        )
    if bool(env.get("AWS_ACCESS_KEY_ID")) != bool(env.get("AWS_SECRET_ACCESS_KEY")):
        raise CxrError(
            "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set: set both secrets, "
            "or neither (a role or instance profile)."
        )
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if urlsplit(uri).scheme in LOCAL_STORES:
        where = f"{uri.split(':', 1)[0]} store on the runner" if uri else "mlflow.db on the runner"
        raise CxrError(
            f"MLFLOW_TRACKING_URI {'is not set' if not uri else 'names a local store'}: runs "
            f"would go to a {where}, lost with it, and the champion gate would always see no "
            f"champion; add the secret in {SECRETS_PAGE} (the team's MLflow server or database)."
        )
    if params["data"]["source"] == "kaggle":
        from cxr.kaggle_client import kaggle_credentials

        if not env.get("KAGGLE_API_TOKEN") and not kaggle_credentials():
            raise CxrError(
                f"data.source is kaggle but KAGGLE_API_TOKEN is not set: add the secret in "
                f"{SECRETS_PAGE} (kaggle.com, Settings, API, Generate New Token)."
            )


# What `version` looks up: the dataset's key and its version's key in params.yaml's data.
DATASETS = {
    "database": ("kaggle_dataset", "kaggle_version"),
    "top-up": ("topup_dataset", "topup_version"),
}


def version(
    params: Mapping[str, Any], env: Mapping[str, str], lookup=None, which: str = "database"
) -> int | None:
    """The Kaggle version of the database (or of the top-up set, `which="top-up"`) to train
    on: Kaggle's current one (unless KAGGLE_FOLLOW_LATEST is false and params.yaml pins one);
    None for other sources, and for the top-up set when data.topup is null."""
    data = params["data"]
    if data["source"] != "kaggle" or (which == "top-up" and not data["topup"]):
        return None
    dataset, key = DATASETS[which]
    pinned = data[key]
    if pinned is not None and env.get("KAGGLE_FOLLOW_LATEST", "true").lower() == "false":
        return int(pinned)
    if lookup is None:
        from cxr.kaggle_client import latest_version as lookup
    return lookup(data[dataset])


def version_changes(lock: Mapping[str, Any], versions: Mapping[str, int | None]) -> list[str]:
    """The Kaggle versions to train on (`{which: version}`, None: not looked up) that differ
    from those dvc.lock's download stage ran with."""
    download = lock.get("stages", {}).get("download", {})
    locked = download.get("params", {}).get("params.yaml", {})
    found = []
    for which, wanted in versions.items():
        key = f"data.{DATASETS[which][1]}"
        if wanted is not None and locked.get(key) != wanted:
            found.append(f"Kaggle {which} version {locked.get(key)} -> {wanted}")
    return found


def _produced(path: str, outs: list[str]) -> bool:
    """Whether `path` is, lies in, or holds only what stages write (`outs`, from dvc.lock)."""
    return any(path == o or path.startswith(f"{o}/") or o.startswith(f"{path}/") for o in outs)


def _tracked(root: Path) -> dict[str, str]:
    """The hash of each path a .dvc file in `root` tracks (data.dvc: the user's images)."""
    found = {}
    for dvcfile in (p for p in root.glob("*.dvc") if p.is_file()):
        for out in (yaml.safe_load(dvcfile.read_text()) or {}).get("outs", []):
            found[out["path"]] = out.get("md5")
    return found


def changes(root: Path, versions: Mapping[str, int | None]) -> list[str]:
    """What would make `dvc exp run` redo work against the dvc.lock in git, deps only: a
    fresh checkout has no outputs, and an output missing is not a change (an upstream stage
    whose deps did not change makes the same one). A path a .dvc file tracks (data/) is
    compared by the hash in that file: it is not pulled yet. `versions`: the Kaggle versions
    to train on (see version_changes); their params' own changes are theirs to say."""
    lock_path = root / "dvc.lock"
    if not lock_path.exists():
        return ["no dvc.lock: nothing has been trained and adopted here yet"]
    lock = yaml.safe_load(lock_path.read_text()) or {}
    found = version_changes(lock, versions)
    looked_up = {f"data.{DATASETS[w][1]}" for w, v in versions.items() if v is not None}
    proc = subprocess.run(
        ["dvc", "status", "--json"], cwd=root, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise CxrError(f"dvc status failed: {proc.stderr.strip().splitlines()[-1:]}")
    tracked = _tracked(root)
    outs = [o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])]
    for stage, entries in json.loads(proc.stdout or "{}").items():
        if stage.endswith(".dvc"):
            continue  # its outputs: compared below, where a stage reads them
        locked = {d["path"]: d.get("md5") for d in lock["stages"].get(stage, {}).get("deps", [])}
        for entry in entries:
            if isinstance(entry, str):  # "changed command", "always changed", ...
                found.append(f"{stage}: {entry}")
                continue
            for path, state in entry.get("changed deps", {}).items():
                if isinstance(state, dict):  # params: {key: modified | new | deleted}
                    keys = [k for k in state if k not in looked_up]
                    found += [f"{stage}: param {k} {state[k]}" for k in keys]
                elif path in tracked:
                    if tracked[path] != locked.get(path):
                        found.append(f"{stage}: {path} {state} ({path}.dvc)")
                elif not (state == "deleted" and _produced(path, outs)):
                    found.append(f"{stage}: {path} {state}")
    return list(dict.fromkeys(found))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr.retrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="the secrets and plugins the retraining needs")
    p = sub.add_parser("version", help="print the Kaggle version to train on (empty: not Kaggle)")
    p.add_argument("--topup", action="store_true", help="the top-up set's (empty: no top-up)")
    p = sub.add_parser("unchanged", help="exit 0 if dvc.lock holds this code, data and params")
    p.add_argument("--kaggle-version", type=int, default=None)
    p.add_argument("--topup-version", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        params = load_params()
        if args.command == "check":
            check(os.environ, params)
        elif args.command == "version":
            found = version(params, os.environ, which="top-up" if args.topup else "database")
            print("" if found is None else found)
        else:
            versions = {"database": args.kaggle_version, "top-up": args.topup_version}
            found = changes(repo_root(), versions)
            if found:
                print("retrain: changed since dvc.lock: " + "; ".join(found[:20]))
                return CHANGED
            print(
                "retrain: nothing changed since dvc.lock (same dataset version, code, data and "
                "params): nothing to train."
            )
    except CxrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
