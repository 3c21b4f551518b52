"""Subcommands of the `dus` CLI: one module each, each with a `register(app)` function."""
