"""Tool calling on the local engine: tools into the prompt, a grammar for the calls, calls out of the text.

The model writes calls in the Hermes format that Qwen2.5, Hermes and SmolLM3
templates use:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

- Prompt: a template that knows tools (it mentions `tools`) gets them as Hugging
  Face passes them (`tools=`, assistant `tool_calls` with arguments as objects,
  `tool` messages); any other template (the embedded SmolLM2's) gets the built-in
  instructions: a system message listing the functions, earlier calls written
  back as `<tool_call>` blocks and results as `<tool_response>` blocks.
- Grammar (engine/structured.py's Lark form): `required` and a named function
  force one or more calls (one when `parallel_tool_calls` is false) whose
  arguments match each function's JSON schema; `auto` lets the first token
  choose between a text answer and calls, and the calls are then enforced the
  same way; `none` renders no tools and parses nothing.
- Output: `parse` splits the text into content and calls; `CallStream` does the
  same on a stream of text deltas and emits OpenAI's delta shape (the first delta
  of a call has its id, type and name, then argument fragments by index). The
  streamed arguments are prefixes of what `parse` finds in the whole text, so
  their concatenation equals the non-streamed arguments for any chunking.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from inferd.engine.structured import JSON_STYLE
from inferd.wire.schema import ChatCompletionRequest, NamedToolChoice

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_INSTRUCTIONS = (
    "You can call functions to help answer. The functions are, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with only this, once per call:\n" + OPEN
    + '\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n' + CLOSE)


def active(body: ChatCompletionRequest) -> bool:
    """Whether this request offers tools the model may call."""
    return bool(body.tools) and body.tool_choice != "none"


def _function_spec(body: ChatCompletionRequest) -> list[dict]:
    return [{"type": "function", "function": tool.function.model_dump(exclude_none=True)} for tool in body.tools]


def _arguments(call) -> dict:
    try:
        value = json.loads(call.function.arguments or "{}")
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {}


def _call_text(name: str, arguments: dict) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{CLOSE}"


def template_messages(body: ChatCompletionRequest, messages: list[dict], native: bool) -> tuple[list[dict], dict]:
    """The messages (already flattened to text) and template arguments for a request with tools.

    `native`: the model's template renders tools itself."""
    offered = active(body)
    out: list[dict] = []
    for m, msg in zip(body.messages, messages):
        if m.role == "assistant" and m.tool_calls:
            calls = [(c.function.name, _arguments(c)) for c in m.tool_calls]
            if native:
                msg = {**msg, "tool_calls": [{"type": "function", "id": c.id,
                                              "function": {"name": name, "arguments": args}}
                                             for c, (name, args) in zip(m.tool_calls, calls)]}
            else:
                text = "\n".join(_call_text(name, args) for name, args in calls)
                msg = {**msg, "content": (msg["content"] + "\n" if msg["content"] else "") + text}
        elif m.role == "tool":
            if native:
                msg = {**msg, "tool_call_id": m.tool_call_id}
            else:
                msg = {"role": "user", "content": f"<tool_response>\n{msg['content']}\n</tool_response>"}
        out.append(msg)
    if not offered:
        return out, {}
    if native:
        return out, {"tools": _function_spec(body)}
    instructions = _INSTRUCTIONS.format(tools="\n".join(json.dumps(t["function"]) for t in _function_spec(body)))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + instructions}
    else:
        out.insert(0, {"role": "system", "content": instructions})
    return out, {}


def grammar(body: ChatCompletionRequest, top: str = "start") -> str | None:
    """The Lark grammar (llguidance's dialect) the answer must follow, its top rule named `top`, or None
    to leave it free."""
    if not active(body):
        return None
    choice = body.tool_choice
    tools = body.tools
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
    schema = {"anyOf": [{"type": "object", "properties": {
        "name": {"const": t.function.name},
        "arguments": t.function.parameters or {"type": "object", "properties": {}}},
        "required": ["name", "arguments"], "additionalProperties": False} for t in tools],
        "x-guidance": JSON_STYLE}
    many = body.parallel_tool_calls and not isinstance(choice, NamedToolChoice)
    lines = [f"{top}: calls" + (" | TEXT" if choice in (None, "auto") else ""),
             'calls: call' + (' ("\\n" call)*' if many else ""),
             f'call: "{OPEN}\\n" %json {json.dumps(schema)} "\\n{CLOSE}"']
    if choice in (None, "auto"):
        lines.append("TEXT: /[^<](.|\\n)*/")  # a text answer: anything that does not open a call
    return "\n".join(lines) + "\n"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class Call:
    name: str | None = None
    arguments: str = ""   # the raw JSON text of the arguments (a prefix while streaming)


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at `start` ends (exclusive), or None if it does not end in `text`."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif depth == 0 and i > start and c in " \t\r\n,}]":
            return i  # the end of a number, true, false or null
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _read_call(body: str) -> Call:
    """The name and arguments of one call's JSON text (`body`, perhaps cut short). The arguments are the
    raw text of their value, so a stream's fragments and the whole answer's agree byte for byte."""
    call = Call()
    name_start = _key_value_start(body, "name")
    end = _value_end(body, name_start) if name_start is not None else None
    if end is None:
        return call
    try:
        name = json.loads(body[name_start:end])
    except ValueError:
        return call
    if not isinstance(name, str):
        return call
    call.name = name
    args_start = _key_value_start(body, "arguments", end)
    if args_start is not None:
        args_end = _value_end(body, args_start)
        call.arguments = body[args_start:args_end] if args_end is not None else body[args_start:]
    return call


def _key_value_start(text: str, key: str, after: int = 0) -> int | None:
    marker = text.find(f'"{key}"', after)
    if marker < 0:
        return None
    colon = text.find(":", marker + len(key) + 2)
    if colon < 0:
        return None
    i = colon + 1
    while i < len(text) and text[i] in " \n\t\r":
        i += 1
    return i if i < len(text) else None


def parse(text: str) -> tuple[str | None, list[Call]]:
    """Content (the text outside calls, or None if there is none) and the complete calls in `text`."""
    content, calls = _split(text, final=True)
    return (content if content.strip() else None), [c for c in calls if c.name is not None]


def _split(text: str, final: bool) -> tuple[str, list[Call]]:
    """Content and calls of `text`; while streaming (`final` false) the trailing call may be partial and a
    trailing prefix of `<tool_call>` is held back from the content."""
    content, calls, pos = [], [], 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            rest = text[pos:]
            if not final:  # hold back what may be the start of a call tag
                for k in range(min(len(OPEN) - 1, len(rest)), 0, -1):
                    if OPEN.startswith(rest[-k:]):
                        rest = rest[:-k]
                        break
            content.append(rest)
            break
        content.append(text[pos:start])
        end = text.find(CLOSE, start)
        inner = text[start + len(OPEN):end if end >= 0 else len(text)]
        call = _read_call(inner.strip())
        if call.name is None and (end >= 0 or final):  # not a call after all: its text stays content
            content.append(text[start:end + len(CLOSE)] if end >= 0 else text[start:])
        else:
            calls.append(call)
        if end < 0:
            break
        pos = end + len(CLOSE)
    return "".join(content), calls


@dataclass
class CallStream:
    """One choice's text deltas in, OpenAI chat deltas out (content and tool-call fragments)."""

    text: str = ""
    sent_content: int = 0
    sent: list[tuple[str, str]] = field(default_factory=list)   # per call: (id, arguments sent so far)

    def feed(self, delta: str, final: bool = False) -> list[dict]:
        self.text += delta
        content, calls = _split(self.text, final)
        out: list[dict] = []
        # content is sent as soon as it is certain, except while all of it is blank: blank text around
        # calls is no content (the whole answer's `content` is then None too)
        if content.strip() and len(content) > self.sent_content:
            out.append({"content": content[self.sent_content:]})
            self.sent_content = len(content)
        for i, call in enumerate(calls):
            if call.name is None:
                continue
            if i == len(self.sent):
                call_id = new_call_id()
                self.sent.append((call_id, ""))
                out.append({"tool_calls": [{"index": i, "id": call_id, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            call_id, done = self.sent[i]
            if len(call.arguments) > len(done) and call.arguments.startswith(done):
                out.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments[len(done):]}}]})
                self.sent[i] = (call_id, call.arguments)
        return out

    @property
    def has_calls(self) -> bool:
        return bool(self.sent)


def merged(deltas: list[dict]) -> dict:
    """One chunk's delta from several: content joined, each call's pieces in one entry."""
    out: dict = {}
    for d in deltas:
        if "content" in d:
            out["content"] = out.get("content", "") + d["content"]
        for piece in d.get("tool_calls", ()):
            entries = out.setdefault("tool_calls", [])
            same = next((e for e in entries if e["index"] == piece["index"]), None)
            if same is None:
                entries.append({**piece, "function": dict(piece["function"])})
            else:
                same["function"]["arguments"] = same["function"].get("arguments", "") + \
                    piece["function"].get("arguments", "")
    return out


def message(text: str) -> tuple[dict, bool]:
    """The assistant message for a whole answer, and whether it holds calls."""
    content, calls = parse(text)
    msg: dict = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [{"id": new_call_id(), "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return msg, bool(calls)

