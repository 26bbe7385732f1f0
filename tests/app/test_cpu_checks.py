"""Every experiment header's "CPU check of the mechanics" command runs as written and writes its table.

The commands are documentation a user copies, so they are read from the headers here, never restated:
a new experiment file is covered by itself, and one whose header has no CPU check fails. A CPU check is
a header comment `#   python run.py -m experiment=<file> ...   # CPU check ...`; its first words may sit
on the lines before, each ending in ` \\` (shell continuation), as a user pastes it into bash."""

import json
import shlex

import pytest
import yaml
from conftest import ROOT, run_cli

MARKER = "# CPU check"


def cpu_checks(header: str) -> list[list[str]]:
    """The CPU-check commands of an experiment file, each as the argument list bash would pass."""
    lines = [line[1:] for line in header.splitlines() if line.startswith("#")]
    commands = []
    for i, line in enumerate(lines):
        if MARKER not in line:
            continue
        words = [line[:line.index(MARKER)].strip()]
        while i > 0 and lines[i - 1].endswith("\\"):  # the command's first lines, before the marked one
            i -= 1
            words.insert(0, lines[i][:-1].strip())
        commands.append(shlex.split(" ".join(words)))
    return commands


def header(experiment: str) -> str:
    return (ROOT / "configs" / "experiment" / f"{experiment}.yaml").read_text()


# Every experiment file but those that read a user study's answers (a `study` node: table3_user_study, no sweep and
# no model; its CPU chain is a Table 2 sweep, then the study: run end to end by tests/app/test_study_table.py)
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")
                     if "study" not in yaml.safe_load(p.read_text()))


def table_name(experiment: str) -> str:
    """The file name the sweep's table gets (hydra.callbacks.sweep_table.name, else the task name)."""
    cfg = yaml.safe_load(header(experiment))
    name = cfg.get("hydra", {}).get("callbacks", {}).get("sweep_table", {}).get("name")
    return cfg["task_name"] if name is None or "${" in str(name) else name


def test_cpu_checks_are_read_from_comments_with_continuations():
    """The reader itself. Catches: a command's continued first lines dropped (the check would run
    `inversion.num_steps=2 ...` without its experiment), the marker's comment or bash quoting left in the
    arguments, a prose line that mentions the CPU check (no command before the marker) taken as one."""
    text = ("# @package _global_\n"
            "# Only small inputs (the CPU check: 8 frames) differ.\n"
            "#   python run.py -m experiment=x                  # GPU, SD 1.5\n"
            "#   python run.py -m experiment=x model=tiny \\\n"
            "#       'editing.reweight={a:10}' data.width=64   # CPU check of the mechanics\n"
            "#   python run.py -m experiment=x data=synthetic   # CPU check\n"
            "task_name: x  # CPU check\n")
    assert cpu_checks(text) == [
        ["python", "run.py", "-m", "experiment=x", "model=tiny", "editing.reweight={a:10}", "data.width=64"],
        ["python", "run.py", "-m", "experiment=x", "data=synthetic"]]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_header_has_a_cpu_check_of_itself_on_the_tiny_model(experiment):
    """Catches: an experiment file without a CPU check (a new table that nobody can try without a GPU), a
    command copied from another header (`experiment=` naming another file), a single run without `-m` (no
    sweep, no table), or one that would download SD 1.5 (no `model=tiny`)."""
    commands = cpu_checks(header(experiment))
    assert commands, f"{experiment}.yaml has no `#   python run.py -m experiment={experiment} ...   # CPU check` line"
    for command in commands:
        assert command[:4] == ["python", "run.py", "-m", f"experiment={experiment}"], command
        assert "model=tiny" in command, command


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_cpu_check_runs_as_written_and_writes_its_table(tmp_path, experiment):
    """Runs the header's CPU check, its outputs redirected under tmp_path, and checks that every job of its
    sweep finished and the table was written. Catches the commands that failed as written: STEM K=256 above
    the tiny model's mid-block tokens (excess_bases=error), more frames than the synthetic pan's photo holds
    (Table 4's 120), sizes above its 512 px (Table 5's 768 and 1024); and any later change to an experiment
    file, the configs or run.py that breaks its documented CPU command."""
    commands = cpu_checks(header(experiment))
    assert commands, experiment
    for n, command in enumerate(commands):
        sweep = tmp_path / f"sweep{n}"
        proc = run_cli(*command[2:], "progress=false", f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path}",
                       f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path, timeout=900)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        name = table_name(experiment)
        assert (sweep / f"{name}.md").is_file() and (sweep / f"{name}.csv").is_file(), command
        provenance = json.loads((sweep / f"{name}.json").read_text())
        assert provenance["jobs"] >= 2 and provenance["jobs_finished"] == provenance["jobs"], provenance["caption"]
