"""Deployments: the places a model is served from (a local engine, remote APIs)."""
