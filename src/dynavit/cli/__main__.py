"""``python -m dynavit.cli``."""

from dynavit.cli import main

main()
