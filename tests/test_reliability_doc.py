"""docs/RELIABILITY.md and the README's reliability summary against the test suite (issue 23, "done when").

Three checks: every row of the bad-input table names tests that exist; every row marked "replayed" is run here,
in-process and without a model, and refused with the message the row quotes; each bullet of the README's summary
(and of RELIABILITY.md's "What is guaranteed") maps to tests that exist (GUARANTEES below)."""

from __future__ import annotations

import ast
import functools
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC = ROOT / "docs" / "RELIABILITY.md"
README_HEADING = "### Reliability: what is guaranteed"
GUARANTEE_HEADING = "## What is guaranteed"
TABLE_HEADING = "## The bad-input table"
COLUMNS = ["case", "example", "outcome", "test", "replayed"]
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]`]*\])?`")

# Each bullet of the summary (its bold lead-in) -> the tests that check what it states. A new bullet needs an entry.
GUARANTEES = {
    "Atomic entries and outputs.": [
        "tests/runs/test_cache.py::test_atomic_file_writes_on_success_and_leaves_nothing_when_the_body_raises",
        "tests/runs/test_cache.py::test_atomic_file_keeps_the_old_file_when_the_body_raises",
        "tests/runs/test_cache.py::test_atomic_dir_leaves_nothing_when_the_body_raises",
        "tests/runs/test_cache.py::test_failed_save_leaves_no_entry_and_no_temporary_folder",
        "tests/runs/test_cache.py::test_a_truncated_inversion_entry_is_inverted_again_and_replaced",
        "tests/data/test_video.py::test_failed_mp4_write_leaves_nothing",
        "tests/data/test_video.py::test_folder_of_other_files_is_not_replaced",
        "tests/data/test_video.py::test_failed_folder_write_keeps_the_old_frames",
        "tests/runs/test_cache.py::test_written_files_follow_the_umask",
        "tests/runs/test_cache_faults.py::test_two_processes_writing_one_key_both_succeed_and_leave_only_the_entry",
        "tests/runs/test_cache_faults.py::test_the_first_complete_entry_is_kept_and_a_reader_never_misses_it",
        "tests/runs/test_cache.py::test_save_keeps_an_existing_complete_entry_and_replaces_a_damaged_one",
        "tests/runs/test_cache_faults.py::test_a_save_removes_the_leftovers_of_killed_writers_and_keeps_live_ones",
        "tests/runs/test_cache_faults.py::test_clean_command_removes_dead_leftovers_in_the_cache_folder_and_its_subfolders",
        "tests/runs/test_cache_faults.py::test_check_writable_refuses_an_unwritable_folder_in_one_line_naming_it_and_the_fix",
        "tests/runs/test_cache_faults.py::test_run_job_refuses_an_unwritable_cache_before_building_the_model",
        "tests/runs/test_cache_faults.py::test_a_failed_save_after_the_inversion_warns_with_the_entry_and_keeps_the_result",
        "tests/runs/test_cache_disk.py::test_a_run_whose_cache_disk_is_full_warns_naming_the_entry_and_finishes",
        "tests/runs/test_cache_disk.py::test_saving_onto_a_full_disk_raises_the_librarys_error_and_leaves_nothing",
        "tests/runs/test_cache_disk.py::test_a_flow_cache_on_a_full_disk_warns_naming_the_entry_and_returns_the_flow",
        "tests/distributed/test_distributed.py::test_a_rank_that_dies_leaves_no_cache_entry",
    ],
    "Verified entries.": [
        "tests/runs/test_cache.py::test_meta_records_the_key_tensors_and_checksums",
        "tests/runs/test_cache.py::test_a_damaged_entry_is_a_miss_with_a_warning_naming_it_and_the_next_save_replaces_it",
        "tests/runs/test_cache.py::test_overwritten_tensor_values_in_a_valid_file_are_a_miss_with_a_warning",
        "tests/runs/test_cache.py::test_an_entry_of_an_older_format_is_a_miss_with_a_warning_and_is_replaced",
        "tests/runs/test_cache.py::test_another_keys_entry_copied_into_a_keys_folder_is_a_miss_with_a_warning_and_is_replaced",
        "tests/runs/test_cache.py::test_an_edited_meta_json_is_a_miss_with_a_warning",
        "tests/runs/test_cache.py::test_tensors_that_differ_from_their_record_are_a_miss_with_a_warning",
        "tests/runs/test_cache.py::test_reconstruction_on_a_cache_hit_is_bit_identical_to_the_miss",
        "tests/data/test_video.py::test_failing_ffmpeg_is_an_error_and_leaves_nothing",
        "tests/data/test_video.py::test_video_with_missing_frames_is_refused",
    ],
    "Versioned keys.": [
        "tests/runs/test_cache_version.py::test_inversion_code_matches_the_digest_recorded_with_the_cache_version",
        "tests/runs/test_cache_version.py::test_a_version_bump_changes_the_inversion_key_so_old_entries_miss",
        "tests/runs/test_cache_version.py::test_check_command_exits_zero_when_the_digest_matches_and_one_when_it_does_not",
        "tests/runs/test_cache.py::test_content_key_changes_with_every_part",
        "tests/app/test_run.py::test_changed_settings_miss_the_cache",
    ],
    "Signals handled.": [
        "tests/app/test_signals.py::test_sigterm_during_the_inversion_finishes_the_wandb_run_as_failed_and_marks_the_job_failed",
        "tests/app/test_signals.py::test_sigterm_while_wandb_starts_a_run_is_raised_once_it_exists_and_the_run_is_finished_failed",
        "tests/app/test_signals.py::test_sigterm_while_wandb_finishes_a_run_lets_it_finish_then_ends_the_job",
        "tests/app/test_signals.py::test_a_second_sigterm_during_the_cleanup_of_the_first_is_ignored",
        "tests/app/test_signals.py::test_sigterm_ends_a_submitit_job_whose_own_handler_ignores_it",
        "tests/app/test_signals.py::test_a_sigterm_handled_inside_a_finaliser_still_ends_the_job",
        "tests/app/test_signals.py::test_sigint_during_the_inversion_is_one_error_line_exit_130_and_the_job_marked_failed",
        "tests/app/test_reliability_run.py::test_a_disk_that_fills_during_the_job_still_ends_with_the_error_line_and_exit_status",
        "tests/app/test_run.py::test_wandb_run_is_marked_failed_when_the_job_fails",
        "tests/reporting/test_tables.py::test_run_py_marks_a_job_that_ended_with_an_error",
        "tests/reporting/test_tables.py::test_a_running_job_is_running_not_failed",
        "tests/reporting/test_tables.py::test_a_truncated_metrics_json_is_one_unreadable_row",
        "tests/reporting/test_tables.py::test_jobs_that_never_started_are_missing_rows_and_count_as_jobs",
    ],
    "torchrun failures.": [
        "tests/app/test_reliability_run.py::test_torchrun_rank_1_killed_leaves_the_cause_in_run_log_and_a_reclaimable_folder",
        "tests/app/test_reliability_run.py::test_torchrun_rank_0_killed_is_a_failed_row_and_the_survivor_prints_the_cause",
        "tests/app/test_reliability_run.py::test_a_killed_ranks_temporary_folder_is_removed_by_the_next_rank_and_a_live_ones_kept",
    ],
    "Separate run folders.": [
        "tests/runs/test_run_dir.py::test_runs_started_in_the_same_second_get_different_folders",
    ],
    "Bad input: one line.": [
        "tests/app/test_run.py::test_bad_input_fails_with_one_clear_line_and_writes_no_cache",
        "tests/runs/test_validation.py::test_misspelt_key_on_the_command_line_is_one_error_line_with_status_2",
        "tests/runs/test_validation.py::test_misspelt_key_names_the_closest_known_key",
        "tests/runs/test_validation.py::test_non_integer_num_bases_is_refused_before_the_model",
        "tests/runs/test_validation.py::test_more_steps_than_training_timesteps_is_refused_before_the_model",
        "tests/runs/test_validation.py::test_more_bases_than_tokens_is_refused_before_the_model",
        "tests/runs/test_validation.py::test_video_too_large_for_memory_is_refused_with_the_estimate",
        "tests/runs/test_validation.py::test_check_memory_false_runs_anyway",
        "tests/data/test_reliability_data.py::test_run_refuses_a_huge_size_with_one_line",
        "tests/data/test_reliability_data.py::test_size_beyond_any_memory_is_refused_before_decoding",
        "tests/data/test_reliability_data.py::test_size_between_the_available_and_the_total_memory_is_refused",
        "tests/data/test_reliability_data.py::test_check_memory_false_decodes_anyway",
        "tests/data/test_reliability_data.py::test_data_check_memory_follows_the_top_level_switch",
        "tests/data/test_reliability_data.py::test_truncated_mp4_read_to_the_end_warns_with_the_counts",
        "tests/data/test_reliability_data.py::test_truncated_mp4_asked_for_all_its_declared_frames_is_refused",
        "tests/app/test_reliability_run.py::test_a_seed_torch_refuses_or_aliases_is_one_error_line",
        "tests/app/test_reliability_run.py::test_seed_range_is_torchs_without_its_negative_aliases",
        "tests/app/test_reliability_run.py::test_a_task_name_that_is_not_one_folder_name_is_refused_before_any_folder_exists",
        "tests/app/test_reliability_run.py::test_a_log_dir_that_is_a_file_is_one_error_line_naming_the_folder_and_the_fix",
        "tests/app/test_reliability_run.py::test_a_log_dir_that_is_a_symlink_loop_is_one_error_line",
        "tests/app/test_reliability_run.py::test_a_sweep_folder_under_a_file_is_one_error_line",
        "tests/app/test_reliability_run.py::test_an_unwritable_log_dir_is_one_error_line",
        "tests/runs/test_validation.py::test_pickled_clip_checkpoint_is_refused_before_unpickling",
        "tests/runs/test_validation.py::test_bin_only_pretrained_folder_says_how_to_convert",
        "tests/runs/test_validation.py::test_unresolvable_interpolation_in_prompt_explains_the_escape",
        "tests/metrics/test_evaluation.py::test_cli_bad_metric_input_is_one_line_and_exit_2_before_the_model",
        "tests/metrics/test_evaluation.py::test_cli_without_clip_weights_says_how_to_provide_them",
        "tests/editing/test_tokenflow.py::test_cli_without_an_edit_prompt_is_one_line_and_exit_2",
        "tests/reporting/test_tables.py::test_a_failed_job_does_not_stop_the_sweep_and_shows_as_failed",
        "tests/diffusion/test_models.py::test_missing_absolute_folder_raises_naming_the_path",
        "tests/diffusion/test_prompts.py::test_long_prompt_is_refused_with_the_token_count_and_the_fix",
        "tests/diffusion/test_prompts.py::test_truncate_gives_the_first_77_tokens_and_warns",
        "tests/data/test_video.py::test_rgba_frames_are_composited_on_white_with_one_warning",
        "tests/data/test_video.py::test_transparent_gif_is_composited_on_white",
        "tests/data/test_video.py::test_native_size_not_multiple_of_8_is_resized_and_logged",
        "tests/test_reliability_doc.py::test_replayed_rows_are_refused_before_the_model",
    ],
}


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    assert heading in text, f"lost its '{heading}' section"
    level = len(heading.split()[0])
    body = text.split(heading, 1)[1]
    end = re.search(rf"^#{{1,{level}}} ", body, re.M)
    return body[:end.start()] if end else body


def bullets(text: str) -> list[str]:
    """The bold lead-ins of the top-level bullets (`- **Lead-in.** ...`), in order; a bullet without one is kept
    whole so that it fails the mapping check."""
    items = re.findall(r"^- (.*)$", text, re.M)
    return [m.group(1) if (m := re.match(r"\*\*(.+?)\*\*", item)) else item for item in items]


def rows() -> list[dict]:
    """The bad-input table's rows (every group), as dicts of COLUMNS, plus the group heading."""
    found, group = [], None
    for line in section(DOC.read_text(), TABLE_HEADING).splitlines():
        if line.startswith("### "):
            group = line[4:]
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if cells == COLUMNS:
                continue
            assert len(cells) == len(COLUMNS), f"row of {len(cells)} cells, not {len(COLUMNS)}: {line}"
            found.append({"group": group, **dict(zip(COLUMNS, cells))})
    return found


@functools.cache
def functions_of(path: str) -> set[str]:
    """The names of the module-level test functions of tests/<file>.py (parametrized or not)."""
    file = ROOT / path
    if not file.is_file():
        return set()
    tree = ast.parse(file.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def missing(test_ids: list[tuple[str, str]]) -> list[str]:
    return [f"{path}::{name}" for path, name in test_ids if name not in functions_of(path)]


# ---- (1) every row names tests that exist ----------------------------------------------------------------------
# Catches: a test the table cites deleted or renamed (seen failing: test_corrupt_mp4 renamed in a copy of the
# suite), a row with no test, a row with a cell too many or too few (a `|` inside a cell).
def test_every_row_names_tests_that_exist():
    table = rows()
    assert len(table) >= 60, f"only {len(table)} rows: the table lost its groups"
    for row in table:
        cited = TEST_ID.findall(row["test"])
        assert cited, f"row without a test (`tests/<file>.py::<function>`): {row['case']}"
        assert not missing(cited), f"row '{row['case']}' cites tests that do not exist: {missing(cited)}"
        assert row["replayed"] in ("", "yes"), f"replayed must be empty or yes: {row['case']}"


def test_every_group_has_its_place_for_new_rows():
    """Catches: the marker after a group's table dropped, so that new rows have no agreed place."""
    text = section(DOC.read_text(), TABLE_HEADING)
    groups = re.split(r"^### ", text, flags=re.M)[1:]
    assert len(groups) >= 8
    for group in groups:
        assert "<!-- new rows of this group go above this line -->" in group, group.splitlines()[0]


# ---- (2) the replayed rows are refused as the table says ---------------------------------------------------------

def replayed() -> list[dict]:
    return [row for row in rows() if row["replayed"] == "yes"]


def replay(row: dict) -> tuple[list[str], list[str]]:
    """(overrides, message fragments) of a replayed row: the example's `python run.py ...` code span, and the
    outcome's `error: ...` code span split at ' ... '."""
    command = re.match(r"`python run\.py ([^`]+)`", row["example"])
    assert command, f"a replayed row's example must start with one `python run.py <overrides>`: {row['case']}"
    quoted = re.search(r"`error: ([^`]+)`", row["outcome"])
    assert quoted, f"a replayed row's outcome must quote the `error: ...` line: {row['case']}"
    return shlex.split(command.group(1)), quoted.group(1).split(" ... ")


@pytest.mark.parametrize("row", replayed(), ids=lambda row: row["case"])
def test_replayed_rows_are_refused_before_the_model(refused, row):
    """The row's command, run in-process as run.py's job runs it (the config Hydra composes from the overrides as
    typed, without the suite's debug=fast; the cache in a temporary folder, device=cpu), is refused before any model
    builder runs, with a one-line message holding the quoted fragments in order, and no cache entry (`refused`,
    tests/conftest.py). Catches: a check moved after the model, a message reworded without the table, a
    table quoting a message the code never prints, a command that does not fail at all."""
    overrides, fragments = replay(row)
    message = refused(*overrides, fast=False)
    position = 0
    for fragment in fragments:
        found = message.find(fragment, position)
        assert found >= 0, f"{row['case']}: {fragment!r} not in (or out of order in) {message!r}"
        position = found + len(fragment)


# ---- (3) each bullet of the summary maps to tests that exist -----------------------------------------------------
# Catches: a bullet added (or a lead-in reworded) without naming its tests here, a mapped test deleted or renamed,
# a mapping left for a bullet that is gone, the README no longer pointing to docs/RELIABILITY.md.

def test_each_readme_bullet_maps_to_tests_that_exist():
    summary = section(README.read_text(), README_HEADING)
    assert "docs/RELIABILITY.md" in summary, "the README's summary must link to docs/RELIABILITY.md"
    leads = bullets(summary)
    assert leads, "no bullets in the README's reliability summary"
    assert [lead for lead in leads if lead not in GUARANTEES] == [], "bullets without tests in GUARANTEES"
    assert [lead for lead in GUARANTEES if lead not in leads] == [], "GUARANTEES maps bullets the README lacks"
    for lead, tests in GUARANTEES.items():
        cited = [tuple(test.split("::")) for test in tests]
        assert cited and missing(cited) == [], f"'{lead}' maps to tests that do not exist: {missing(cited)}"


def test_the_full_statement_has_the_same_bullets_as_the_summary():
    """Catches: RELIABILITY.md's statement gaining a guarantee (or losing one) that the README's summary and the
    mapping above do not have."""
    full = bullets(section(DOC.read_text(), GUARANTEE_HEADING))
    assert full == bullets(section(README.read_text(), README_HEADING))
