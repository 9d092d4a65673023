"""Images in chat through the OpenAI SDK on a tiny random SmolVLM: answers as transformers gives them,
image tokens in usage, the prefix cache keyed by image, bad images refused with 400 (the server stays
healthy), and http(s) image URLs fetched only from the allowed hosts (a server on loopback)."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import time
import zlib

import httpx
import openai
import pytest
import torch
import transformers
from PIL import Image

from inferd.engine.tokenizer import Tokenizer
from inferd.models.loader import load_checkpoint
from tests.api.conftest import MODEL, ServerProc
from tests.tiny_vlm import png, reference_processor

QUESTION = "What is in it?"
PROMPT = "<|im_start|>User:<image>" + QUESTION + "<end_of_utterance>\nAssistant:"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def ask(url: str, **image_url) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, **image_url}},
                                         {"type": "text", "text": QUESTION}]}]


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, tuple[bytes, str]] = {}

    def do_GET(self):  # noqa: N802 - the stdlib's name
        if self.path == "/slow.png":
            time.sleep(3)
        if self.path not in self.files and self.path != "/slow.png":
            self.send_error(404)
            return
        body, mime = self.files.get(self.path, (png(8, 8), "image/png"))
        self.send_response(200)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def files():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Files.files
    httpd.shutdown()


@pytest.fixture(scope="module")
def vlm_server(tiny_vlm):
    srv = ServerProc(tiny_vlm, "--allowed-media-domains", "127.0.0.1", "--max-image-bytes", "100000",
                     "--media-fetch-timeout", "1", "--max-image-pixels", "1000000", "--block-size", "4").wait_ready()
    yield srv
    srv.stop()


def _reference(tiny_vlm, data: bytes, max_tokens: int) -> tuple[list[int], int]:
    """transformers' greedy answer and prompt length for PROMPT with this image."""
    model = transformers.Idefics3ForConditionalGeneration.from_pretrained(tiny_vlm, dtype=torch.float32)
    inputs = reference_processor(tiny_vlm)(images=[[Image.open(io.BytesIO(data))]], text=[PROMPT],
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    n = inputs["input_ids"].shape[1]
    return out[0, n:].tolist(), n


def test_image_chat_answers_as_transformers_and_counts_image_tokens(vlm_server, tiny_vlm):
    client = vlm_server.client()
    data = png(20, 33, seed=7)
    expected, prompt_tokens = _reference(tiny_vlm, data, 8)
    tok = Tokenizer(load_checkpoint(tiny_vlm, progress=False).tokenizer)
    answer = client.chat.completions.create(model=MODEL, messages=ask(data_url(data)), max_tokens=8,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert answer.choices[0].message.content == tok.decode(expected)
    assert answer.usage.prompt_tokens == prompt_tokens  # the image's 28 tokens and their tags included
    chunks = list(client.chat.completions.create(model=MODEL, messages=ask(data_url(data)), max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tok.decode(expected)
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_prefix_cache_hits_on_a_repeated_image_and_misses_on_another_of_the_same_size(vlm_server, tiny_vlm):
    client = vlm_server.client()
    first_data, other_data = png(33, 20, seed=11), png(33, 20, seed=12)
    tok = Tokenizer(load_checkpoint(tiny_vlm, progress=False).tokenizer)
    text_before_image = len(tok.encode("<|im_start|>User:", add_special_tokens=False)) // 4 * 4  # whole blocks

    def cached(data: bytes) -> tuple[int, int]:
        r = client.chat.completions.create(model=MODEL, messages=ask(data_url(data)), max_tokens=2)
        return r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens

    assert cached(first_data)[0] <= text_before_image
    hit, total = cached(first_data)
    assert hit >= total - 4  # every full 4-token block but the one holding the last token
    miss, _ = cached(other_data)
    assert miss == text_before_image  # the same tokens, but another image: none of the image's blocks


def _huge_png(width: int, height: int) -> bytes:
    """A small PNG file whose header says width x height (the pixel data is never read)."""
    data = bytearray(png(2, 2))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


BAD = {
    "truncated PNG": (data_url(png(20, 20)[:60]), "truncated or corrupt"),
    "huge dimensions": (data_url(_huge_png(4000, 3000)), "4000x3000 pixels"),
    "PNG sent as JPEG": (data_url(png(8, 8), "image/jpeg"), "not image/jpeg"),
    "text MIME type": (data_url(b"hello", "text/plain"), "MIME type"),
    "not base64": ("data:image/png;base64,@@@", "base64"),
    "not an image": (data_url(b"\x89PNG but not really"), "not an image"),
    "file URL": ("file:///etc/passwd", "data: URL"),
    "host not allowed": ("http://localhost/cat.png", "not fetched from 'localhost'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_images_get_400_naming_the_part_and_the_server_stays_healthy(vlm_server, case):
    url, message = BAD[case]
    client = vlm_server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ask(url), max_tokens=2)
    body = err.value.body
    assert message in body["message"] and body["param"] == "messages.0.content.0.image_url", body
    assert httpx.get(vlm_server.url + "/health", timeout=5).status_code == 200
    ok = client.chat.completions.create(model=MODEL, messages=ask(data_url(png(9, 9))), max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_detail_is_honoured_and_checked(vlm_server):
    client = vlm_server.client()
    url = data_url(png(20, 33, seed=3))
    high = client.chat.completions.create(model=MODEL, messages=ask(url, detail="high"), max_tokens=1)
    low = client.chat.completions.create(model=MODEL, messages=ask(url, detail="low"), max_tokens=1)
    assert high.usage.prompt_tokens - low.usage.prompt_tokens > 6 * 4  # six tiles more, with their tags
    with pytest.raises(openai.BadRequestError, match="detail"):
        client.chat.completions.create(model=MODEL, messages=ask(url, detail="ultra"), max_tokens=1)


def test_http_images_are_fetched_from_allowed_hosts_within_limits(vlm_server, files):
    base, served = files
    data = png(20, 33, seed=7)
    served["/cat.png"] = (data, "image/png")
    served["/big.png"] = (b"\x00" * 150_000, "image/png")
    served["/page.html"] = (b"<html></html>", "text/html")
    client = vlm_server.client()
    fetched = client.chat.completions.create(model=MODEL, messages=ask(f"{base}/cat.png"), max_tokens=4, temperature=0)
    inline = client.chat.completions.create(model=MODEL, messages=ask(data_url(data)), max_tokens=4, temperature=0)
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    for path, message in [("/missing.png", "HTTP 404"), ("/big.png", "larger than 100000 bytes"),
                          ("/page.html", "'text/html'"), ("/slow.png", "longer than 1 s")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=ask(base + path), max_tokens=1)
        assert message in err.value.body["message"], (path, err.value.body)
    assert httpx.get(vlm_server.url + "/health", timeout=5).status_code == 200


def test_a_text_model_refuses_images(server):
    with pytest.raises(openai.BadRequestError, match="does not take images"):
        server.client().chat.completions.create(model=MODEL, messages=ask(data_url(png(8, 8))), max_tokens=1)
