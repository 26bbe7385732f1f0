"""Table 3 of the paper from a study's answers: for each comparison and question, the share of answers choosing
each method, with its 95% Wilson score interval, the number of answers and of participants, beside the paper's.

    out = write_table3("study/answers.sqlite", "study/manifest.json", "study")
    # -> study/table3.md (caption line, then the table) and study/table3.csv (one row per method and question)

Cells: "83.3% [55.2, 95.3] (10/12)": the percentage of the comparison's answers to that question that chose the
method, the Wilson interval (`wilson`, z = 1.96) in percent, choices / answers. A comparison without answers reads
"no answers". The caption names the sweep the videos came from and its provenance (both from the manifest).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from stem.core.atomic import atomic_file
from stem.core.errors import StudyError
from stem.study.pairs import COMPARISONS, comparison_name, load_manifest, manifest_digest
from stem.study.store import QUESTIONS, read_answers

Z95 = 1.959963984540054   # the standard normal's 0.975 quantile
# Table 3 of the paper: percent of users choosing each method, (edit fidelity, temporal consistency)
PAPER = {"FateZero": (17, 33), "STEM-FateZero": (83, 67), "TokenFlow": (25, 33), "STEM-TokenFlow": (75, 67)}
NAMES = {"FateZero": "FateZero", "STEM-FateZero": "Ours (STEM-FateZero)", "TokenFlow": "TokenFlow",
         "STEM-TokenFlow": "Ours (STEM-TokenFlow)"}   # the paper's row names
LABELS = {"fidelity": "Edit fidelity", "consistency": "Temporal consistency"}
CSV_HEADER = ("comparison", "method", "name", "question", "chosen", "answers", "participants", "percent", "ci_low",
              "ci_high", "paper_percent")
CELL = ("percent", "ci_low", "ci_high", "chosen", "answers", "participants", "paper_percent")   # per question


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n),
    clipped to [0, 1]; (nan, nan) when n = 0."""
    if n == 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def table3_rows(answers: list[dict]) -> list[dict]:
    """One dict per comparison, method and question (the paper's order): "comparison", "method", "name", "question",
    "chosen" (answers choosing the method), "answers" (the comparison's answers to the question), "participants"
    (who gave them), "percent", "ci_low", "ci_high" (percent; None without answers), "paper_percent"."""
    rows = []
    for methods in COMPARISONS:
        comparison = comparison_name(methods)
        mine = [a for a in answers if {a["left_method"], a["right_method"]} == set(methods)]
        for method in methods:
            for q, question in enumerate(QUESTIONS):
                asked = [a for a in mine if a["question"] == question]
                n, k = len(asked), sum(1 for a in asked if a["chosen"] == method)
                low, high = wilson(k, n)
                rows.append({"comparison": comparison, "method": method, "name": NAMES[method], "question": question,
                             "chosen": k, "answers": n, "participants": len({a["participant"] for a in asked}),
                             "percent": 100 * k / n if n else None, "ci_low": 100 * low if n else None,
                             "ci_high": 100 * high if n else None, "paper_percent": PAPER[method][q]})
    return rows


def _cell(row: dict) -> str:
    if not row["answers"]:
        return "no answers"
    return f"{row['percent']:.1f}% [{row['ci_low']:.1f}, {row['ci_high']:.1f}] ({row['chosen']}/{row['answers']})"


def to_markdown(rows: list[dict], caption: str) -> str:
    """The caption line, then the paper's layout: a row per method, each question's cell beside the paper's value,
    and the participants of the row's comparison (per question when they differ)."""
    header = ["Method"] + [x for q in QUESTIONS for x in (LABELS[q], "Paper")] + ["Participants"]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for methods in COMPARISONS:
        for method in methods:
            cells = {r["question"]: r for r in rows if r["method"] == method}
            people = list(dict.fromkeys(cells[q]["participants"] for q in QUESTIONS))
            lines.append("| " + " | ".join([NAMES[method]] + [x for q in QUESTIONS for x in (
                _cell(cells[q]), f"{cells[q]['paper_percent']}%")] + [" / ".join(map(str, people))]) + " |")
    return "\n".join(lines) + "\n"


def paper_layout(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The paper's layout as numbers (a W&B table): (header, one row per method in the paper's order), each row the
    paper's name, the method, its comparison, then per question its `CELL` values ("Edit fidelity: percent", ...,
    "Edit fidelity: paper_percent"; None without answers)."""
    header = ["Method", "method", "comparison"] + [f"{LABELS[q]}: {k}" for q in QUESTIONS for k in CELL]
    table = []
    for methods in COMPARISONS:
        for method in methods:
            cells = {r["question"]: r for r in rows if r["method"] == method}
            table.append([NAMES[method], method, comparison_name(methods)] +
                         [cells[q][k] for q in QUESTIONS for k in CELL])
    return header, table


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in rows:
        writer.writerow(["" if row[k] is None else row[k] for k in CSV_HEADER])
    return out.getvalue()


def caption(manifest: dict, manifest_path, answers: list[dict]) -> str:
    people = len({a["participant"] for a in answers})
    return (f"Table 3 (user study): percent of answers choosing each method, 95% Wilson score interval in brackets "
            f"(choices/answers); {people} participant{'s' * (people != 1)}, {len(answers)} answers; videos from the "
            f"sweep {manifest.get('sweep', 'unknown')} (manifest {manifest_path}, {len(manifest['pairs'])} pairs). "
            f"{manifest.get('provenance') or ''}".rstrip())


def write_table3(db_path, manifest_path, out_dir, name: str = "table3") -> dict:
    """Table 3 of the answers in `db_path` (a study of the manifest at `manifest_path`) to `<out_dir>/<name>.md`
    and `.csv`, each written atomically. Returns {"rows", "markdown", "csv", "files", "caption", "manifest" (its
    content), "settings" (the study's, from the database: seed, pairs per participant), "answers",
    "participants"}. StudyError, before anything is written, when the database or manifest is missing or
    unreadable, or the database answers another manifest."""
    manifest = load_manifest(manifest_path)
    answers, settings = read_answers(db_path)
    if settings.get("manifest") != manifest_digest(manifest):
        raise StudyError(f"the database {db_path} holds the answers of another manifest than {manifest_path}")
    rows, title = table3_rows(answers), caption(manifest, manifest_path, answers)
    markdown, text = to_markdown(rows, title), to_csv(rows)
    files = []
    for suffix, content in ((".md", markdown), (".csv", text)):
        path = Path(out_dir) / f"{name}{suffix}"
        with atomic_file(path) as tmp:
            tmp.write_text(content)
        files.append(path)
    return {"rows": rows, "markdown": markdown, "csv": text, "files": files, "caption": title, "manifest": manifest,
            "settings": {k: v for k, v in settings.items() if k != "manifest"}, "answers": len(answers),
            "participants": len({a["participant"] for a in answers})}
