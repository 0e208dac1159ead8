"""`flowar train`: FlowAR training on Ray Train (DDP or FSDP2), resumable, logged to MLflow.
Entry point: pipelines.train.job.run_train(cfg); the per-worker loop is pipelines/train/loop.py."""
