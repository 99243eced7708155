"""Everything that writes or reads files: atomic writes, checkpoints, run directories and the run-config schema,
image grids and figures, loggers."""
