"""The engine's API-process side: the async client, output processing and detokenization."""
