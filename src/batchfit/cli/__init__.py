"""The `batchfit` command: a thin layer that parses flags, calls the library and prints.

`commands` holds one function per subcommand and `main`; `format` prints results as tables.
"""
