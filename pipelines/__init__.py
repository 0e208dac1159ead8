"""The Ray jobs behind the `flowar` command (pipelines/cli.py), built on the model library `flowar/`.

core/ is what every job shares (configs, Ray start-up, storage, MLflow, progress, images); data/ the
two dataset formats (image sources, latent pyramids); train/, evaluate/, sweep/ and submit/ are the
jobs with several modules; encode, vae_train, sample, import_published and quickstart are one module
each, with what runs inside Ray workers beside them (encode_writer, vae_train_loop). registry.py
lists the jobs; cli.py is the command line.
"""
