"""`flowar evaluate`: FID, IS, KID and precision/recall of a model, sharded over Ray actors.
Entry point: pipelines.evaluate.job.run_evaluate(cfg); one actor's work is pipelines/evaluate/worker.py."""
