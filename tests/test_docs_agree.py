"""Docs and config comments that state a setting say the value the code uses (issue #12, point 6: the
attention store's budget and place had drifted apart in EDITING.md and the SLURM launcher's comment)."""

import inspect
import re
from pathlib import Path

import yaml

from stem.editing.fatezero import FateZeroEditor

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = inspect.signature(FateZeroEditor.__init__).parameters
EDITING_MD = (ROOT / "docs" / "EDITING.md").read_text()
SLURM = (ROOT / "configs" / "hydra" / "launcher" / "slurm.yaml").read_text()


def config(*parts) -> dict:
    return yaml.safe_load(ROOT.joinpath("configs", *parts).read_text())


def test_store_budget_in_the_docs_is_the_one_the_code_and_configs_use():
    """Catches: EDITING.md or the slurm.yaml comment stating another budget than the Python default and
    configs/editing/fatezero.yaml (the 16-vs-48 GiB drift), or another raised budget than Table 2's rows."""
    budget = DEFAULTS["store_budget_gib"].default
    assert config("editing", "fatezero.yaml")["store_budget_gib"] == budget
    table2 = {config("table2", p.name)["editing"]["store_budget_gib"]
              for p in (ROOT / "configs" / "table2").glob("*fatezero*.yaml")}
    assert len(table2) == 1
    (raised,) = table2
    stated = re.search(r"`store_budget_gib` \((\d+) GiB.*?set (\d+) for", " ".join(EDITING_MD.split()))
    assert stated and (float(stated[1]), float(stated[2])) == (budget, raised), stated
    stated = re.search(r"store_budget_gib \((\d+) GiB;\s*# Table 2's FateZero rows set (\d+)", SLURM)
    assert stated and (float(stated[1]), float(stated[2])) == (budget, raised), stated


def test_store_place_in_the_docs_is_the_default():
    """Catches: the slurm.yaml comment or EDITING.md naming another default place for the store than the code's
    (the comment once said "in memory" while describing another default, or the default changes alone)."""
    place = DEFAULTS["attention_store"].default
    assert config("editing", "fatezero.yaml")["attention_store"] == place == "memory"
    assert "in host RAM by default (editing.attention_store=memory;" in SLURM
    assert "`attention_store=memory` keeps every map in host RAM" in EDITING_MD
