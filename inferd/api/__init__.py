"""The OpenAI-compatible HTTP API: FastAPI app, routes, errors, metrics (`inferd serve`).

The app runs in the API process; the engine core runs in its own process behind
`inferd.engine.client.async_client.AsyncEngine`. Start it with `run_server` (the CLI) or
build it around a started engine with `build_app`.
"""
