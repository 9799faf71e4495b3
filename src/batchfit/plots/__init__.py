"""Every batchfit picture, drawn from plain data (the results' `to_dict()` shapes).

Each `*_png` function returns PNG bytes (the report inlines them); each `plot_*` function
takes a result object and writes a PNG file atomically (the CLI's `--plot`). matplotlib's
object interface on the Agg canvas only, so no pyplot state is touched or left behind.
"""
