"""The `batchfit` command: a thin layer that parses flags, calls the library and prints.

`main` (the entry point and its one error path), `parser` (the argparse tree), `arguments`
(the parser class, the actions that check numbers and sizes as they are parsed, and the helpers
that read the parsed arguments), `commands` (one function per subcommand), `train_command`
(`batchfit train`, with its torchrun relaunch), `paths` (output paths checked before work
starts), `progress` (bars on a terminal, timestamped lines otherwise) and `format`,
`format_diagnosis` (tables and JSON on stdout).
"""
