import subprocess
import sys
import time

from cxr.timing import Phases, parse, process_seconds


def test_phase_line_round_trips_and_adds_up():
    phases = Phases("train@cnn")
    assert phases.seconds["start-up"] > 0  # the interpreter and the imports ran before
    time.sleep(0.05)
    phases.done("fit")
    phases.move("fit", "checkpoints", 0.02)
    phases.done("logging")
    stage, total, parsed = parse(phases.line())
    assert stage == "train@cnn"
    assert list(parsed) == ["start-up", "fit", "checkpoints", "logging"]
    assert abs(total - sum(parsed.values())) < 0.2
    assert phases.seconds["checkpoints"] == 0.02 and phases.seconds["fit"] >= 0.03
    assert set(phases.metrics()) == {
        "time_startup_seconds",
        "time_fit_seconds",
        "time_checkpoints_seconds",
        "time_logging_seconds",
    }


def test_other_lines_are_not_phase_lines():
    assert parse("train@cnn: {'val_loss': 0.1}") is None
    assert parse("Running stage 'train@cnn':") is None


def test_process_age_counts_from_the_process_start():
    """A process that waits 1.5 s before importing cxr.timing is at least 1.5 s old."""
    script = "import time; time.sleep(1.5); from cxr.timing import process_seconds; "
    script += "print(process_seconds())"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert 1.5 <= float(out.stdout) < 30, out.stderr
    assert process_seconds() > 0


def test_a_part_that_came_first_is_listed_before_its_phase():
    phases = Phases("train@cnn")
    phases.done("data")
    time.sleep(0.02)
    phases.done("fit")
    phases.move("fit", "build", 0.01, before=True)
    assert list(phases.seconds) == ["start-up", "data", "build", "fit"]
    assert phases.seconds["build"] == 0.01 and phases.seconds["fit"] >= 0.01
