"""The README and docs/ pages say what is true: every relative link (and its #anchor) leads
somewhere, every `make` target and every `cxr` subcommand and option a page names exists,
and no page points at the project's own issue tracker."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cxr.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
COMMAND = re.compile(r"^\s*(?:\$ )?((?:make|cxr)(?: .*)?)$")


def ids(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to -."""
    text = FENCE.sub("", page.read_text())
    found = set()
    for heading in re.findall(r"^#+ +(.+?) *#*$", text, re.M):
        plain = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
        found.add(re.sub(r"[^\w\- ]", "", plain).replace(" ", "-"))
    return found


def commands(page: Path) -> list[str]:
    """The `make ...` and `cxr ...` commands of a page: inline code and code-block lines,
    without their comments."""
    text = page.read_text()
    found = re.findall(r"`((?:make|cxr) [^`]*)`", FENCE.sub("", text))
    for block in FENCE.findall(text):
        for line in block.splitlines()[1:-1]:
            if match := COMMAND.match(line):
                found.append(match.group(1))
    return [re.sub(r"\s+#.*$", "", command).strip() for command in found]


def broken_links(page: Path) -> list[str]:
    """The page's relative links to a file, or a heading, that does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not this test's to check
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in anchors(linked)
        ):
            broken.append(target)
    return broken


MAKE_TARGETS = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def wrong_commands(page: Path) -> list[str]:
    """The page's `make` commands with a target the Makefile lacks, and its `cxr` commands
    with a subcommand or an option (before `--`) that `cxr` lacks, each with why."""
    _, subcommands = build_parser()
    wrong = []
    for command in commands(page):
        words = shlex.split(command.replace("...", ""))
        if words[0] == "make":
            if missing := {w for w in words[1:] if "=" not in w} - MAKE_TARGETS:
                wrong.append(f"`{command}`: no target {sorted(missing)}")
        elif len(words) == 1 or words[1].startswith("-"):  # `cxr`, `cxr --version`
            if not set(words[1:]) <= {"--help", "-h", "--version"}:
                wrong.append(f"`{command}`: not an option of cxr")
        elif words[1] not in subcommands:
            wrong.append(f"`{command}`: no subcommand {words[1]}")
        else:
            usage = subcommands[words[1]].format_help()
            ours = words[2 : words.index("--")] if "--" in words else words[2:]
            for option in (w.split("=")[0] for w in ours if w.startswith("-")):
                if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", usage):
                    wrong.append(f"`{command}`: `cxr {words[1]}` has no option {option}")
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=ids)
def test_relative_links_lead_to_files_and_headings_that_exist(page):
    assert not broken_links(page)


@pytest.mark.parametrize("page", PAGES, ids=ids)
def test_make_targets_and_cxr_commands_a_page_names_exist(page):
    assert not wrong_commands(page)


def test_the_checks_catch_a_broken_link_a_missing_target_and_an_unknown_option(tmp_path):
    (tmp_path / "other.md").write_text("## A `code` heading, with punctuation!\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n[ok](#top) [ok](other.md#a-code-heading-with-punctuation) [web](https://x.org)\n"
        "[bad](#nowhere) [gone](missing.md) [bad](other.md#top)\n"
        "Run `make demo`, `make nosuch`, `cxr tune cnn --trials 3 -- -n x`, `cxr nosuch`.\n"
        "```\ncxr serve --port 1  # a comment\ncxr serve --trials 1\n```\n"
    )
    assert broken_links(page) == ["#nowhere", "missing.md", "other.md#top"]
    assert wrong_commands(page) == [
        "`make nosuch`: no target ['nosuch']",
        "`cxr nosuch`: no subcommand nosuch",
        "`cxr serve --trials 1`: `cxr serve` has no option --trials",
    ]


@pytest.mark.parametrize("page", PAGES, ids=ids)
def test_no_page_refers_to_the_projects_issue_tracker(page):
    text = page.read_text()
    assert not re.search(r"\bissues? #?\d+|\(#\d+\)|\bPR #?\d+", text, re.I), ids(page)


SCRIPTS = re.compile(r"\bbenchmarks/(\w+\.py)\b")


@pytest.mark.parametrize("page", [*PAGES, ROOT / "params.yaml"], ids=ids)
def test_every_script_a_page_names_exists_and_no_page_needs_a_folder_outside_the_clone(page):
    """A benchmark a page tells readers to run is there; the data it is run on is the reader's
    own (the database, or a subset drawn by benchmarks/real_subset.py), not a folder beside
    this clone. The one exception: the tests' real sample, whose default is named beside
    the variable that moves it (docs/development.md)."""
    text = page.read_text()
    assert [s for s in SCRIPTS.findall(text) if not (ROOT / "benchmarks" / s).is_file()] == []
    outside = re.findall(r"\.\./shared\S*|cxr-real-dev", text)
    allowed = ["../shared/data/cxr-real-sample`"] if page.name == "development.md" else []
    assert outside == allowed, ids(page)
