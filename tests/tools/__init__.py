"""Helper scripts and modules for the integration tests (local SLURM, headless browser)."""
