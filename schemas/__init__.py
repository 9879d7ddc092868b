"""Declarations shared by the CLI and the workers: settings, job specs, tables and errors.

Nothing here imports the rest of tuneq, torch or Celery.
"""
