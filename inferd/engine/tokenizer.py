"""Tokenizer and chat template for a loaded model.

Wraps a `tokenizers.Tokenizer` built from the checkpoint's `TokenizerSpec`:
encoding adds BOS when the model wants it, and chat templates are rendered with a
sandboxed Jinja environment configured the way Hugging Face renders them
(trim_blocks, lstrip_blocks, `raise_exception`, `tojson`), so the same template
gives the same prompt as `apply_chat_template`.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from inferd.models.checkpoint import TokenizerSpec


class ChatTemplateError(ValueError):
    pass


def with_chat_template(spec: TokenizerSpec, template: str | None) -> TokenizerSpec:
    """`spec` with `template` (Jinja text, or the path of a file holding it) as its chat template."""
    if template is None:
        return spec
    path = Path(template)
    if "{" not in template and path.is_file():
        template = path.read_text()
    elif "{" not in template:
        raise ValueError(f"chat_template: {template!r} is neither a file nor a Jinja template")
    return dataclasses.replace(spec, chat_template=template)


class Tokenizer:
    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._tok = HFTokenizer.from_str(spec.tokenizer_json)
        self.bos_token_id = self._id(spec.bos_token)
        self.eos_token_id = self._id(spec.eos_token)
        self.eos_token_ids = list(spec.eos_token_ids) or (
            [self.eos_token_id] if self.eos_token_id is not None else [])
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.spec.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.spec.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    @cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for: a text of B bytes has at least B / this tokens."""
        return max(1, max(len(self._tok.decode([i], skip_special_tokens=False).encode())
                          for i in range(self.vocab_size)))

    def too_long(self, text_bytes: int, max_model_len: int) -> bool:
        """Whether a prompt of `text_bytes` bytes is sure to exceed `max_model_len` tokens, before
        tokenizing it (a multi-megabyte prompt is refused without the work)."""
        return text_bytes > self.max_token_bytes * max_model_len

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        added = self._tok.get_added_tokens_decoder()
        return frozenset(i for i, t in added.items() if t.special)

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.spec.chat_template:
            raise ChatTemplateError("this model has no chat template; use a plain prompt")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise ChatTemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        return env.from_string(self.spec.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        """The rendered prompt; with `continue_final_message` (vLLM's name) it ends inside the final
        message, after its content, so that the model continues it (an assistant prefill)."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ChatTemplateError(f"messages[{i}] must be an object with a 'role'")
        rendered = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt and not continue_final_message,
            bos_token=self.spec.bos_token or "", eos_token=self.spec.eos_token or "", **kwargs)
        if not continue_final_message:
            return rendered
        final = messages[-1].get("content") or ""
        # the template closes the final message (an end-of-turn token, a newline): cut there; templates
        # that trim contents render the final message trimmed
        for text in (final, final.rstrip(), final.strip()):
            at = rendered.rfind(text) if text else -1
            if at >= 0:
                return rendered[:at + len(text)]
        raise ChatTemplateError("continue_final_message: the chat template does not render the final "
                                "message's content, so there is nothing to continue")

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        # the template already writes any BOS it wants, as HF's apply_chat_template assumes
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)
