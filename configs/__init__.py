"""Hydra's config tree. Installed (pip install, wheel) as the package `stem_configs`, which `run.py` reads
as `pkg://stem_configs` when no `configs/` lies beside it; Hydra needs this file to see a package."""
