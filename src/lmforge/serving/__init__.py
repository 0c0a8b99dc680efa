"""Serving: an OpenAI-compatible HTTP server with dynamic batching, and a web chat page."""
