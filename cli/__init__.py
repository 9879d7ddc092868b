"""The ``tuneq`` command line: a thin skin over ``tuneq.worker``."""
