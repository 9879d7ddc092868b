"""The job lifecycle and the queue: the Celery app, every status transition, the runner, the
reaper, submission, leases, live workers, notifications, the worker process.
"""
