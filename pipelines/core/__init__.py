"""What every job shares: the config system (config.py), Ray start-up, local/URI storage, MLflow
tracking, driver progress and image conversions. Nothing here is a job; no module imports a job."""
