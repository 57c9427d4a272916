"""File formats and paths: checkpoints (paths, values, descriptions), rank
files and shards, class-name files. Imports only pruning_math below it."""
