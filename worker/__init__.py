"""The worker side of tuneq, in five parts; imports flow downwards, and all of them may use
``tuneq.schemas``:

- ``jobs``: the job lifecycle and the queue (Celery app, transitions, runner, reaper, submission);
- ``views``: read-side views (reports, queue ETAs, sweep comparisons);
- ``ml``: the machine-learning work, with no queue and no database;
- ``store``: the database, one module per aggregate;
- ``io``: data files and the artifact store.
"""
