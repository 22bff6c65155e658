"""Training data: CSV and JSONL ingest and validation, column resolution, formatting into examples, splits."""
