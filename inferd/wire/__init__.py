"""The OpenAI wire format: request bodies, the typed request every layer reads, and errors."""
