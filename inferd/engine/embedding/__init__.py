"""Embedding models: their spec, tokenizer, encoder, own process, and the async client to it."""
