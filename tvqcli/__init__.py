"""The `tvq` command line: thin Typer commands over the tvq library."""
