"""The OpenAI-compatible HTTP server: ``create_app`` builds it, ``serve`` runs it."""
