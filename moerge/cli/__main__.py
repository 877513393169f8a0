"""``python -m moerge.cli`` runs the ``moerge`` command."""

from moerge.cli import main

main()
