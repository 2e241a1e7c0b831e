"""The command-line entry points, one module per ``odm-sr-*`` command (``pyproject.toml`` ``[project.scripts]``):
train, eval, upscale, analyze, complexity, report, export. Each parses its arguments (Hydra or argparse) and calls
the library function that does the work (``odm_sr.train.train``, ``odm_sr.eval.evaluate``, ...)."""
