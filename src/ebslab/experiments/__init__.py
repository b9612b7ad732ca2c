"""Layer 4, experiments: sweeps (local, Ray, Slurm executors) and the Optuna search with its confirmation. Imports the layers below. See ARCHITECTURE.md."""
