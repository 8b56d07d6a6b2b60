"""The Typer shell: one module per command, shared options, one output sink, one error table."""
