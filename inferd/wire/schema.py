"""The OpenAI wire format's request bodies, validated, and `usage()`.

Request models use OpenAI's field names, plus vLLM's sampling extras (top_k,
min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids,
include_stop_str_in_output, skip_special_tokens, prompt_logprobs) and its scheduling
`priority` (an integer, lower is scheduled sooner). Pydantic checks shapes and
bounds (so nothing out of range reaches msgpack or torch); `SamplingParams` checks
meaning and names the offending parameter. Unknown fields are ignored, as vLLM
does, so clients that send extras keep working.

Bodies are validated once, at the edge (wire/request.py's `parse_request`);
`validation_error()` turns pydantic's complaint into one OpenAI-style message
that names the parameter. `output_limit` is the one rule for a chat answer's
token cap, read by the engine, the estimate and the provider translations.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferd.engine.sampling_params import InvalidParameterError, SamplingParams
from inferd.wire.errors import ErrorKind, InferdError, invalid

_I32 = 2**31 - 1
_I63 = 2**63 - 1
PRIORITY_LIMIT = 1000
MAX_STOPS, MAX_STOP_CHARS = 64, 512  # stop strings a request may give, and the longest  # `priority` is an int in [-PRIORITY_LIMIT, PRIORITY_LIMIT]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # many clients send `"field": null` for "not set"
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(WireModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: the running usage in every chunk


class JSONSchemaFormat(WireModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(WireModel):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingRequest(WireModel):
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=-_I63, le=_I63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # stop strings are matched against every detokenized delta: bounded in count and length
    stop: Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)] | list[
        Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] | None = Field(None, max_length=MAX_STOPS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, le=_I32)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=_I32)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=-_I32, le=_I32)
    # vLLM's scheduling extra: lower is scheduled sooner; the Batch API runs at 10
    priority: int = Field(0, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT, strict=True)
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def output_constraint(self) -> tuple[str, Any, str] | None:
        """(kind, spec, parameter) of what the output must match, if anything (engine/structured.py's
        kinds); a 400 when the request names two constraints or a malformed one."""
        found: list[tuple[str, Any, str]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("json_object", None, "response_format"))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise InvalidParameterError("response_format", "json_schema.schema is required for type "
                                            "json_schema")
            found.append(("json", fmt.json_schema.schema_, "response_format"))
        so = self.structured_outputs
        if so is not None:
            named = [(kind, value) for kind, value in (("json", so.json_), ("regex", so.regex),
                     ("choice", so.choice), ("grammar", so.grammar), ("json_object", so.json_object or None))
                     if value is not None]
            found += [(kind, value, "structured_outputs") for kind, value in named]
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                found.append((kind, value, f"guided_{kind}"))
        if len(found) > 1:
            raise InvalidParameterError(found[1][2], "give one output constraint, not several ("
                                        + ", ".join(sorted({f[2] for f in found})) + ")")
        return found[0] if found else None

    def token_bias(self) -> dict[int, float] | None:
        """`logit_bias` with its keys as token ids (OpenAI sends them as strings)."""
        if not self.logit_bias:
            return None
        try:
            return {int(token): bias for token, bias in self.logit_bias.items()}
        except ValueError:
            raise InvalidParameterError("logit_bias", "keys must be token ids") from None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None, grammar: str | None = None) -> SamplingParams:
        if any(not -_I32 <= t <= _I32 for t in self.stop_token_ids or []):
            raise InvalidParameterError("stop_token_ids", "values must be 32-bit integers")

        def opt(value, default):
            return default if value is None else value

        return SamplingParams(
            n=self.n, temperature=opt(self.temperature, 1.0), top_p=opt(self.top_p, 1.0),
            top_k=opt(self.top_k, 0), min_p=opt(self.min_p, 0.0), seed=self.seed,
            presence_penalty=opt(self.presence_penalty, 0.0),
            frequency_penalty=opt(self.frequency_penalty, 0.0),
            repetition_penalty=opt(self.repetition_penalty, 1.0), max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens, logit_bias=self.token_bias(), grammar=grammar)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage
                    and self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=_I32)
    echo: bool = False
    logprobs: int | None = Field(None, ge=-_I32, le=_I32)
    best_of: int | None = Field(None, ge=-_I32, le=_I32)
    suffix: str | None = None

    @property
    def output_limit(self) -> int:
        """Tokens each completion may have (OpenAI's default: 16)."""
        return self.max_tokens


class ImageURL(WireModel):
    url: str
    detail: str | None = None


class ContentPart(WireModel):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


def content_text(content: str | list[ContentPart] | None) -> str:
    """A message's text: the string itself, or its text parts joined (other parts as `<type>`)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join((part.text or "") if part.type == "text" else f"<{part.type}>" for part in content)


class FunctionCall(WireModel):
    name: str
    arguments: str = "{}"  # a JSON object, as text (OpenAI's form)


class ToolCall(WireModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(WireModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None


class Tool(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None           # a tool message: the call it answers


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's bound: a chat answer has at least one token (a completion may ask for 0,
    # lm-eval's loglikelihood request); the estimate and every provider read `output_limit`
    max_tokens: int | None = Field(None, ge=1, le=_I32)
    max_completion_tokens: int | None = Field(None, ge=1, le=_I32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=-_I32, le=_I32)
    tools: list[Tool] | None = Field(None, max_length=512)
    # reasoning models: a thinking budget (inferd's and vLLM's name; OpenAI's effort levels map to budgets),
    # whether to return the thinking, and arguments for the chat template (Qwen3's enable_thinking)
    max_reasoning_tokens: int | None = Field(None, ge=0, le=_I32)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    include_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's assistant prefill: the answer continues the last message

    def check_continuation(self) -> None:
        """`continue_final_message` continues an assistant message, in place of a new turn."""
        if not self.continue_final_message:
            return
        if self.messages[-1].role != "assistant":
            raise InvalidParameterError("continue_final_message", "the last message must be the assistant's "
                                        "message to continue")
        if self.add_generation_prompt:
            raise InvalidParameterError("continue_final_message", "cannot be combined with "
                                        "add_generation_prompt: true (set it to false)")
        if self.n > 1:
            raise InvalidParameterError("continue_final_message", "continues one answer; n must be 1")

    def check_tools(self) -> None:
        """What a tool request must hold beyond its fields' shapes (InvalidParameterError otherwise)."""
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise InvalidParameterError("tools", "function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidParameterError("tool_choice", f"names {choice.function.name!r}, which is not in tools")
        if choice == "required" and not names:
            raise InvalidParameterError("tool_choice", "'required' needs tools")
        if self.tools and self.output_constraint() is not None:
            raise InvalidParameterError("tools", "cannot be combined with an output constraint "
                                        "(response_format, structured_outputs)")

    @property
    def output_limit(self) -> int | None:
        """The client's output cap: `max_completion_tokens` wins over `max_tokens`; None: no cap.
        The one rule for the engine, the estimate and the provider translations."""
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens


class EmbeddingRequest(WireModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=_I32)
    user: str | None = None
    truncate: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=_I32)

    def inputs(self) -> list[str] | list[list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if not self.input:
            raise invalid("input: must not be empty", "input")
        if isinstance(self.input[0], int):
            return [self.input]
        if any(isinstance(x, str) for x in self.input) and any(not isinstance(x, str) for x in self.input):
            raise invalid("input: mix of strings and token ids", "input")
        return list(self.input)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: int | None = None) -> dict:
    """OpenAI usage; `cached_tokens` are prompt tokens served from the prefix cache, `reasoning_tokens`
    the completion tokens a reasoning model spent thinking (given only for such models)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": min(reasoning_tokens, completion_tokens)}
    return out


def validation_error(exc: ValidationError) -> InferdError:
    """One message for all of pydantic's complaints, naming the first offending parameter."""
    problems, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if loc and not loc[0].isdigit():
            param = param or loc[0]
        where = ".".join(loc)
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return InferdError(ErrorKind.INVALID_REQUEST, "; ".join(problems[:5]) or "the request body is invalid",
                         status=400, param=param)
