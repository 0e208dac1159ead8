"""The data formats the jobs exchange: image sources (sources.py, and bundled.py's Fashion-MNIST
lookup) in, latent pyramid datasets (latents.py: Parquet + metadata.json) out of `flowar encode`."""
