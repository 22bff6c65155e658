"""Durable state under the home directory: the SQLite database (numbered migrations) and stored files."""
