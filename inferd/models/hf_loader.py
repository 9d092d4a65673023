"""Load a Hugging Face model directory: config.json, *.safetensors, tokenizer files.

The chat template comes from tokenizer_config.json, a chat_template.jinja file or
(as processors save it) chat_template.json; the ids that end generation are the union
of config.json's and generation_config.json's `eos_token_id`. A vision-language model
(Idefics3) also brings preprocessor_config.json and processor_config.json, read into
the checkpoint's `VisionSpec`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from inferd.models.checkpoint import Checkpoint, TokenizerSpec
from inferd.models.idefics3 import is_vision_language, vision_spec


def load_hf_dir(path: Path, *, progress: bool = True) -> Checkpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    config = json.loads(config_file.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model directory {path} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
               desc="loading weights", disable=not progress)
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                tensors[name] = st.get_tensor(name)
        bar.update(f.stat().st_size)
    bar.close()
    vision = None
    if is_vision_language(config):
        vision = vision_spec(config, _json_file(path / "preprocessor_config.json"),
                             _json_file(path / "processor_config.json"))
    return Checkpoint(config=config, tensors=tensors,
                      tokenizer=_tokenizer_spec(path, config), source=str(path), vision=vision)


def _json_file(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _tokenizer_spec(path: Path, config: dict) -> TokenizerSpec:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"model directory {path} has no tokenizer.json")
    tcfg = _json_file(path / "tokenizer_config.json")
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = path / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    if template is None:
        template = _json_file(path / "chat_template.json").get("chat_template")

    eos_ids: list[int] = []
    gen_file = path / "generation_config.json"
    sources = [config] + ([json.loads(gen_file.read_text())] if gen_file.is_file() else [])
    for src in sources:
        value = src.get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in eos_ids:
                eos_ids.append(i)
    return TokenizerSpec(
        tokenizer_json=tok_file.read_text(),
        bos_token=_token_str(tcfg.get("bos_token")),
        eos_token=_token_str(tcfg.get("eos_token")),
        pad_token=_token_str(tcfg.get("pad_token")),
        add_bos_token=bool(tcfg.get("add_bos_token", False)),
        add_eos_token=bool(tcfg.get("add_eos_token", False)),
        chat_template=template,
        eos_token_ids=eos_ids,
    )
