"""The worker side of tuneq: the Celery app, the job runner, and the work it runs."""
