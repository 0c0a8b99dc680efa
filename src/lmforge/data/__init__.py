"""Data: reading text, named data sets, preparation into token files, batching."""
