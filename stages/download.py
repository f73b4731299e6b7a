"""download: fetch the raw images (data.source) into raw/, in the Kaggle layout."""

from pathlib import Path

from cxr.console import quiet

quiet()  # first: drops TensorFlow's known start-up notices (CXR_VERBOSE=1: all)

from cxr.download import download  # noqa: E402
from cxr.errors import run_stage  # noqa: E402
from cxr.params import stage_params  # noqa: E402
from cxr.repo import repo_root  # noqa: E402


def main() -> None:
    info = download(
        stage_params("download")["data"],
        Path("raw"),
        Path("reports/download.json"),
        cache_dir=repo_root() / ".cache" / "downloads",
    )
    print(f"download: {info['source']}: {info['files']}")


if __name__ == "__main__":
    run_stage(main)
