"""A faithful local Adobe IMS, for tests, CI and `imsd demo`."""
