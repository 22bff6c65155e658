"""Training data: CSV ingest and validation, column resolution, profiling, formatting into examples."""
