"""`flowar sweep`: Ray Tune sweeps of whole training runs, each trial an MLflow child run.
Entry point: pipelines.sweep.job.run_sweep; the sweep file's schema and checks are pipelines/sweep/config.py."""
