"""What knows no model and no file: the bounds' math, networks, options, errors, limits, progress bars, the
system and its threads."""
