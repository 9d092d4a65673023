"""Offline use in one process: `LLM` (generate and embed) over an in-process engine core."""
