"""The `batchfit` command: a thin layer that parses flags, calls the library and prints.

`main` (the entry point and its one error path), `parser` (the argparse tree), `arguments`
(the parser class and the actions that check numbers and sizes as they are parsed), `commands`
(one function per subcommand), `paths` (output paths checked before work starts), `progress`
(bars on a terminal, timestamped lines otherwise) and `format` (tables and JSON on stdout).
"""
