"""What every side shares: the run config, tasks, the component map, messages and their checks, aggregation maths, the results folder, on-disk client state."""
