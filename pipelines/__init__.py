"""The Ray jobs behind the `flowar` command (pipelines/cli.py), built on the model library `flowar/`.

core/ is what every job shares (configs, Ray start-up, storage, MLflow, progress, images); data/ the
two dataset formats (image sources, latent pyramids); train/, evaluate/ and sweep/ are the jobs with
several modules; encode, vae_train, sample, import_published, quickstart and submit are one module each.
"""
