"""`python -m tvqcli` runs the `tvq` command."""

from tvqcli.main import main

main()
