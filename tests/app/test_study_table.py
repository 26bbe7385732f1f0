"""Table 3 of a user study through run.py (`experiment=table3_user_study`) and `scripts/make_table3.py --wandb`
(stem.app.study_table): the table in the run folder, its W&B run read back from the offline files, and bad input.
The study is built by `stem.study.pairs.write_study` from fake Table 2 job folders (no model runs); its answers are
simulated here and tallied by the test itself, so every number is checked against the choices the test made."""

import csv
import json
import random

import pytest
import yaml
from conftest import assert_one_error_line, read_wandb_records, run_cli, run_script
from study_fakes import make_job
from test_study_table3 import wilson_reference
from test_wandb_logging import logged_table, run_config, run_record

from stem.study.store import AnswerStore

PAPER = {("FateZero", "fidelity"): 17, ("FateZero", "consistency"): 33, ("STEM-FateZero", "fidelity"): 83,
         ("STEM-FateZero", "consistency"): 67, ("TokenFlow", "fidelity"): 25, ("TokenFlow", "consistency"): 33,
         ("STEM-TokenFlow", "fidelity"): 75, ("STEM-TokenFlow", "consistency"): 67}   # the paper's Table 3
ROWS = [("FateZero", "FateZero vs STEM-FateZero"), ("STEM-FateZero", "FateZero vs STEM-FateZero"),
        ("TokenFlow", "TokenFlow vs STEM-TokenFlow"), ("STEM-TokenFlow", "TokenFlow vs STEM-TokenFlow")]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A Table 2 sweep of 2 clips x 4 rows (fake job folders, with the multirun.yaml of task table2_editing), its
    study (4 pairs), and 5 participants answering all of them with seeded choices. Returns the folders and the
    test's own tally {(method, question): [times chosen, answers, {participants}]}."""
    from stem.study.pairs import write_study

    root = tmp_path_factory.mktemp("table3")
    sweep = root / "sweep"
    for job, (clip, row) in enumerate((c, r) for c in ("wolf", "car_turn")
                                      for r in ("fatezero", "stem_fatezero", "tokenflow", "stem_tokenflow")):
        make_job(sweep, job, row, clip, f"{clip} in watercolor")
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"task_name": "table2_editing"}))
    manifest = write_study([sweep], root / "study")
    tally = {key: [0, 0, set()] for key in PAPER}
    rng = random.Random(3)
    with AnswerStore(root / "study" / "answers.sqlite", manifest, seed=0) as store:
        for person in range(5):
            who = f"user{person}"
            for shown in store.plan(who):
                for question in ("fidelity", "consistency"):
                    side = rng.choice(["left", "right"])
                    store.answer(who, shown["pair"], question, side)
                    for s in ("left", "right"):
                        cell = tally[(shown[s], question)]
                        cell[0] += s == side
                        cell[1] += 1
                        cell[2].add(who)
    return {"root": root, "sweep": sweep, "db": root / "study" / "answers.sqlite",
            "manifest": root / "study" / "manifest.json", "tally": tally}


def expected_cell(study, method, question) -> list:
    """percent, ci_low, ci_high, chosen, answers, participants, paper percent, from the test's tally."""
    k, n, people = study["tally"][(method, question)]
    low, high = wilson_reference(k, n)
    return [100 * k / n, 100 * max(0.0, low), 100 * min(1.0, high), k, n, len(people), PAPER[(method, question)]]


def summary(folder) -> dict:
    """The last value of each top-level summary key of the one W&B run under `folder`."""
    return {i.key: json.loads(i.value_json) for r in read_wandb_records(folder)
            if r.WhichOneof("record_type") == "summary" for i in r.summary.update if i.key}


def check_logged_table(study, folder):
    """The W&B table "table3" under `folder`: the paper's rows in its order, each cell's numbers as tallied."""
    data, logged = logged_table(folder, "table3")
    assert logged[("table3", "nrows")] == 4
    assert data["columns"][:3] == ["Method", "method", "comparison"]
    assert data["columns"][3:10] == ["Edit fidelity: percent", "Edit fidelity: ci_low", "Edit fidelity: ci_high",
                                     "Edit fidelity: chosen", "Edit fidelity: answers", "Edit fidelity: participants",
                                     "Edit fidelity: paper_percent"]
    assert data["columns"][10].startswith("Temporal consistency: ") and len(data["columns"]) == 17
    names = ["FateZero", "Ours (STEM-FateZero)", "TokenFlow", "Ours (STEM-TokenFlow)"]
    for row, name, (method, comparison) in zip(data["data"], names, ROWS, strict=True):
        assert row[:3] == [name, method, comparison]
        want = expected_cell(study, method, "fidelity") + expected_cell(study, method, "consistency")
        assert row[3:] == pytest.approx(want, abs=1e-9), method


def test_make_table3_wandb_logs_the_papers_layout_with_the_answers_numbers(study, tmp_path, monkeypatch):
    """`--wandb`: one offline run (WANDB_MODE unset) under <out dir>/wandb, in the Table 2 sweep's group
    ("table2_editing/<parent>/<sweep folder>", as its jobs), job type and name table3, whose table holds each
    method's percent, Wilson interval, choices, answers, participants and paper value as the test tallied them, and
    whose summary holds the caption, the markdown file's text and the cells' numbers. Bugs caught: --wandb ignored,
    the wide table's columns shifted between the two questions, the paper's values under the wrong method, the
    W&B numbers taken from another comparison, the run left outside the sweep's group, online by default."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    proc = run_script("make_table3.py", study["db"], study["manifest"], out, "--wandb")
    assert proc.returncode == 0, proc.stderr
    record = run_record(out)
    assert (record.run_group, record.job_type, record.display_name) == (
        f"table2_editing/{study['root'].name}/sweep", "table3", "table3")
    assert run_config(record)["study"]["db"] == str(study["db"].resolve())
    check_logged_table(study, out)
    logged = summary(out)
    assert logged["markdown"] == (out / "table3.md").read_text() and logged["caption"] in logged["markdown"]
    k, n, people = study["tally"][("STEM-TokenFlow", "consistency")]
    assert logged["STEM-TokenFlow/consistency/percent"] == pytest.approx(100 * k / n)
    assert (logged["STEM-TokenFlow/consistency/answers"], logged["participants"], logged["answers"]) == (
        n, 5, 5 * 4 * 2)
    assert len(list(out.glob("wandb/offline-run-*"))) == 1


def test_run_py_table3_experiment_writes_the_table_into_its_run_folder_and_logs_it(study, tmp_path):
    """`python run.py experiment=table3_user_study study.db=... study.manifest=... logger=wandb`: table3.md/.csv in
    the run folder outputs/table3_user_study/runs/<date>/<time> (paths.log_dir), their percentages those the test
    tallied, status.json "done", the W&B run in that folder (the sweep's group, named after the task) with the
    same table. Bugs caught: run.py running a model job for the experiment (no study node dispatch), the table
    written into the current folder instead of the run folder, status.json left "running", the configured
    logger not used."""
    proc = run_cli("experiment=table3_user_study", f"study.db={study['db']}", f"study.manifest={study['manifest']}",
                   f"paths.log_dir={tmp_path}", "logger=wandb", cwd=tmp_path, env={"WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "table3_user_study" / "runs").glob("*/*")
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table3_user_study"]   # nothing beside the run folder
    with (run_dir / "table3.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["question"]) for r in rows] == [(m, q) for m, _ in ROWS
                                                            for q in ("fidelity", "consistency")]
    for r in rows:
        k, n, people = study["tally"][(r["method"], r["question"])]
        assert (int(r["chosen"]), int(r["answers"]), int(r["participants"])) == (k, n, len(people))
        assert float(r["percent"]) == pytest.approx(100 * k / n)
    k, n, _ = study["tally"][("STEM-FateZero", "fidelity")]
    low, high = wilson_reference(k, n)
    md = (run_dir / "table3.md").read_text()
    assert f"| Ours (STEM-FateZero) | {100 * k / n:.1f}% [{100 * max(0, low):.1f}, {100 * min(1, high):.1f}] " \
           f"({k}/{n}) | 83% |" in md
    assert f"videos from the sweep {study['sweep'].resolve()}" in md.splitlines()[0]
    record = run_record(run_dir)
    assert (record.run_group, record.job_type, record.display_name) == (
        f"table2_editing/{study['root'].name}/sweep", "table3", "table3_user_study")
    check_logged_table(study, run_dir)


@pytest.mark.parametrize("case", ["no_db_value", "no_db_file"])
def test_run_py_table3_with_no_database_is_one_line_and_writes_no_table(study, tmp_path, case):
    """study.db not given, or naming no file: one line `error: ...`, exit status 2, status.json "failed" and no
    table file (nor an empty database created by sqlite3 at the mistyped path). Bugs caught: a traceback, a
    table of 0 answers from a database sqlite3 created, a W&B run started before the input was checked."""
    db = [] if case == "no_db_value" else [f"study.db={tmp_path / 'nowhere.sqlite'}"]
    proc = run_cli("experiment=table3_user_study", *db, f"study.manifest={study['manifest']}",
                   f"paths.log_dir={tmp_path / 'logs'}", "logger=wandb", cwd=tmp_path)
    words = "no value for study.db" if case == "no_db_value" else "answers database not found"
    assert_one_error_line(proc, words)
    (run_dir,) = (tmp_path / "logs" / "table3_user_study" / "runs").glob("*/*")
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    assert not list(tmp_path.rglob("table3*.*")) and not (run_dir / "wandb").exists()
    assert not (tmp_path / "nowhere.sqlite").exists()


def test_a_sweep_of_table3_jobs_writes_each_table_and_no_sweep_table(study, tmp_path):
    """`python run.py -m experiment=table3_user_study ...` (one job per database): the job folder holds its
    table3.md, and the end-of-sweep callback writes no sweep table. Bug caught: a sweep table of "failed" rows
    (the jobs write no metrics.json) beside correct Table 3s."""
    proc = run_cli("-m", "experiment=table3_user_study", f"study.db={study['db']}",
                   f"study.manifest={study['manifest']}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sweep" / "0" / "table3.md").is_file()
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0", "multirun.yaml"]
