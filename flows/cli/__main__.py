"""``python -m flows.cli``: the same as ``vlmbatch``."""

from flows.cli import main

main()
