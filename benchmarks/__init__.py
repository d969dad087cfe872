"""Benchmarks and calibration scripts of bdsafety: run from a source checkout, never imported by the library."""
