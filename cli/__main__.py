"""``python -m tuneq.cli``: the same as the ``tuneq`` command."""

from tuneq.cli.main import cli

cli(prog_name="tuneq")
