"""Running a protocol: the sequential runner, its run folder and training."""
