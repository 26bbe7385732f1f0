"""Where run.py's configs are, and Hydra's compose API over them for callers other than run.py (the demo app).

`CONFIG_PATH`: configs/ of this checkout (beside run.py; an editable install too), else the installed copy
`pkg://stem_configs` (a wheel: `stem-run`, `stem-demo`). An absolute path: Hydra would take a relative one as a
package path when run.py is imported as a module.
"""

from __future__ import annotations

from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG_PATH = str(REPO_CONFIGS) if (REPO_CONFIGS / "config.yaml").is_file() else "pkg://stem_configs"


def compose_run(overrides: list[str]):
    """The config `python run.py <overrides>` gets, Hydra's node included (`cfg.hydra`): composed from
    `CONFIG_PATH` with Hydra's compose API. Hydra's global state is cleared first and left initialised."""
    from hydra import compose, initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    if CONFIG_PATH.startswith("pkg://"):
        context = initialize_config_module(config_module=CONFIG_PATH.removeprefix("pkg://"), version_base="1.3")
    else:
        context = initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3")
    with context:
        return compose("config", overrides=list(overrides), return_hydra_config=True)
