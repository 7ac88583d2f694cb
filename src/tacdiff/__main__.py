"""``python -m tacdiff``: the same command line as the ``tacdiff`` script."""

from tacdiff.cli import app

app(prog_name="tacdiff")
