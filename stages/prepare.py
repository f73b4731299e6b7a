"""prepare: index raw/ and data/, split, decode once into prepared/ (cache + manifest)."""

from pathlib import Path

from cxr.errors import run_stage
from cxr.io import write_json
from cxr.params import load_params
from cxr.prepare import prepare


def main() -> None:
    params = load_params()
    summary = prepare(
        Path("raw"), [Path("data")], params["data"]["classes"], params["prepare"], Path("prepared")
    )
    write_json(Path("reports/prepare.json"), {"n_images": summary["n_images"], **summary["counts"]})
    print(f"prepare: {summary['n_images']} images, {summary['counts']}")


if __name__ == "__main__":
    run_stage(main)
