"""The data formats the jobs exchange: image sources (sources.py, with shards.py's WebDataset and
Parquet readers and bundled.py's Fashion-MNIST lookup) in, latent pyramid datasets (latents.py:
Parquet + metadata.json) out of `flowar encode`; stream.py is how training reads them back."""
