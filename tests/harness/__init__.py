"""Starts the emulator and a real Envoy with the filter, for `make run` and the e2e suite."""
