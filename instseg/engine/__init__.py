"""Training / evaluation loops, optimisation and checkpoint I/O."""
