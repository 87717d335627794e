"""Training entry points and configs reproducing the papers' tables (see ``experiments/run.py``)."""
