"""Device-side parts that run outside the daemon's process wiring too (the fleet's simulator
runs them for its simulated devices)."""
