"""Shared building blocks for the scripts in `scripts/`.

Each script runs as `python scripts/NAME.py` (or under `accelerate launch`), which puts
`scripts/` on `sys.path`, so `from toolkit import ...` works without installing anything.
"""
