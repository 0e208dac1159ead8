"""`flowar sweep`: Ray Tune sweeps of whole training runs, each trial an MLflow child run.
Entry point: pipelines.sweep.job.run_sweep(load_sweep(path, overrides)); config.py is the sweep file
and its checks, trial.py one trial and its MLflow child run, summary.py the report at the end."""
