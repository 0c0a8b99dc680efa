"""Conversion to and from other ecosystems' checkpoint formats."""
