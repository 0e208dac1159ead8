"""`flowar submit JOB ...` and `flowar jobs ...`: run any job on a Ray cluster from a laptop.
Entry point: pipelines.submit.job.run_submit; outputs.py and upload.py check before anything is uploaded."""
