"""A plain sentence-transformers embeddings server: the peer inferd's /v1/embeddings is compared with.

What a team would write without an inference server: FastAPI + uvicorn, the model
loaded once, each request's texts encoded by `SentenceTransformer.encode` in the
threadpool as it arrives (no batching across requests), the OpenAI response shape.

    python benchmarks/peers/st_server.py --port 8200 --threads 2
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool


def build_app(model_dir: str) -> FastAPI:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        vectors = await run_in_threadpool(model.encode, texts, batch_size=64)
        return {"object": "list", "model": body.get("model"),
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                         for i, v in enumerate(vectors)]}

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from inferd.models.default_embedding_model import default_embedding_model_path

    uvicorn.run(build_app(str(default_embedding_model_path())), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
