"""``python -m noln.cli``."""

from noln.cli import main

main()
