"""The Hydra application: the only package that imports hydra, omegaconf or wandb.

`run.py` (the `@hydra.main` entry point) hands the composed config to `stem.app.launch.task`, which runs
`stem.app.job.run_job`: every object built from its `_target_`, the job run, the logger always closed.
`loggers` (W&B, none), `signals` (SIGTERM), `callbacks` (Hydra callbacks: the sweep folder, the sweep's
table) complete it.
"""
