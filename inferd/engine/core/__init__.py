"""The engine core, in its own process: scheduler, KV cache manager, model runner and sampler."""
