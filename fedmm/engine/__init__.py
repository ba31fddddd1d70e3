"""Running the Simulation Engine: the Ray instance a simulation uses and the single-pass message poller."""
