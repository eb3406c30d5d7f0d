"""OpenAI API request and response schemas (msgspec Structs) and their mapping to SamplingParams."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import msgspec

from shoal.sampling_params import SamplingParams
from shoal.structured.params import StructuredOutputsParams
from shoal.structured.requests import structured_params

# Bounds on the work one HTTP request may ask for: every sequence becomes an engine request,
# so an unbounded `n` or prompt batch lets one small body exhaust an API server's memory.
MAX_N = 128
MAX_SEQUENCES_PER_REQUEST = 1024

# Requests accept unknown fields (clients send many we do not use); responses keep `null`
# fields because OpenAI's own responses carry them.


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Fields completions and chat share, OpenAI's and the vLLM extensions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Structured outputs: OpenAI's response_format, vLLM's guided_* and structured_outputs
    # (shoal.structured.requests checks them; docs/structured-outputs.md).
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: dict[str, Any] | None = None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """`ValueError` naming the field for unsupported or out-of-range values. With
        `best_of` > n, `n` is `best_of` (the route keeps the n best) and logprobs are on (at
        least 0), for the cumulative logprob that ranks the sequences."""
        if self.n > MAX_N:
            raise ValueError(f"n: must be at most {MAX_N}, got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        num_sequences = self.num_sequences
        if num_sequences > self.n and logprobs is None:
            logprobs = 0
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=num_sequences,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=(
                1.0 if self.repetition_penalty is None else self.repetition_penalty
            ),
            logit_bias=_logit_bias(self.logit_bias),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=list(self.bad_words or []),
            structured_outputs=self.structured_outputs_params(),
        )

    @property
    def num_sequences(self) -> int:
        """How many sequences to generate: `best_of` when set (at least n), else n.
        `ValueError` naming `best_of`."""
        best_of = self.best_of
        if best_of is None or best_of == self.n:
            return self.n
        if best_of < self.n:
            raise ValueError(f"best_of: must be at least n ({self.n}), got {best_of}")
        if best_of > MAX_N:
            raise ValueError(f"best_of: must be at most {MAX_N}, got {best_of}")
        if self.stream:
            raise ValueError("best_of: cannot be used with stream (the best are known last)")
        return best_of

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The output constraint of the structured-output fields; `ValueError` naming one."""
        return structured_params(
            response_format=self.response_format,
            guided_json=self.guided_json,
            guided_regex=self.guided_regex,
            guided_choice=self.guided_choice,
            guided_grammar=self.guided_grammar,
            guided_decoding_backend=self.guided_decoding_backend,
            guided_whitespace_pattern=self.guided_whitespace_pattern,
            structured_outputs=self.structured_outputs,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's `{"token id": bias}` with integer keys; `ValueError` naming `logit_bias`."""
    if not bias:
        return None
    converted = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ValueError(f"logit_bias: key {key!r} is not a token id") from None
        converted[token_id] = float(value)
    return converted


class CompletionRequest(_SamplingFields, kw_only=True):
    # A string, a list of strings, a list of token ids or a list of token-id lists; checked
    # in `prompts()` (msgspec unions cannot hold two list types). Optional only when
    # `prompt_embeds` is given.
    prompt: str | list[Any] | None = None
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True
    # vLLM's: logprobs of the prompt tokens (top alternatives per position).
    prompt_logprobs: int | None = None
    # vLLM's: prompts as input embeddings, each base64 of `torch.save` of a [tokens, hidden]
    # tensor (--enable-prompt-embeds; shoal.api.prompt_embeds).
    prompt_embeds: str | list[str] | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of a (possibly batched) request; `ValueError` naming `prompt`."""
        p = self.prompt
        if p is None:
            if self.prompt_embeds is None:
                raise ValueError("prompt: required (or prompt_embeds)")
            return []
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt: must not be empty")
        if len(p) * self.n > MAX_SEQUENCES_PER_REQUEST and not all(_is_token_id(t) for t in p):
            raise ValueError(
                f"prompt: {len(p)} prompts x n={self.n} exceeds {MAX_SEQUENCES_PER_REQUEST} "
                "sequences per request"
            )
        if all(_is_token_id(t) for t in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) and x and all(_is_token_id(t) for t in x) for x in p):
            return [list(x) for x in p]
        raise ValueError(
            "prompt: must be a string, a list of strings, a list of token ids "
            "or a list of token-id lists"
        )

    def to_sampling_params(self) -> SamplingParams:
        """With `echo` and `logprobs`, the prompt's logprobs too (OpenAI's prompt scoring);
        `max_tokens` 0 only where there is a prompt to return (`echo`, `prompt_logprobs`)."""
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.max_tokens == 0 and not (self.echo or self.prompt_logprobs is not None):
            raise ValueError("max_tokens: must be at least 1 (0 only with echo or prompt_logprobs)")
        params = self._sampling_params(self.max_tokens, self.logprobs)
        num_prompt = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            num_prompt = max(num_prompt or 0, self.logprobs)
        if num_prompt is not None:
            params = msgspec.structs.replace(params, prompt_logprobs=num_prompt)
        return params

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None or (self.echo and self.logprobs is not None)


def _is_token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Names the chat route itself gives the template renderer (the conversation, the flags, the
# template): a `chat_template_kwargs` entry of the same name would clash with them in the call
# (a TypeError, so a 500) instead of reaching the template.
RESERVED_CHAT_TEMPLATE_KWARGS = frozenset(
    {"messages", "add_generation_prompt", "chat_template", "template", "special_tokens"}
)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    # OpenAI's message shapes (null content beside tool_calls, tool messages, text parts,
    # `name`) are checked by shoal.processing.chat_template, which also serves the offline
    # LLM.chat and /tokenize: errors name `messages[i].field`, or the message the template
    # cannot render.
    messages: list[Any]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # vLLM extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    prompt_logprobs: int | None = None

    def to_sampling_params(self) -> SamplingParams:
        """Tools are the route's (`plan_tools`: the server's flags decide `auto`)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ValueError("top_logprobs: must be in [0, 20]")
        # Checked with the sampling fields: the route calls this before rendering the chat.
        clashing = sorted(
            RESERVED_CHAT_TEMPLATE_KWARGS.intersection(self.chat_template_kwargs or {})
        )
        if clashing:
            raise ValueError(
                f"chat_template_kwargs: {clashing} are set by the server, not the request"
            )
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        if max_tokens is not None and max_tokens < 1:
            field = (
                "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            )
            raise ValueError(f"{field}: must be at least 1")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self._sampling_params(max_tokens, logprobs)
        if self.prompt_logprobs is not None:
            if self.stream:  # as vLLM: the chat stream has no place for them
                raise ValueError("prompt_logprobs: not available with stream")
            params = msgspec.structs.replace(params, prompt_logprobs=self.prompt_logprobs)
        return params


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template: str | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------- responses


class UsageInfo(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(msgspec.Struct):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ScoredCompletionChoice(CompletionChoice):
    """A choice of a request with vLLM's `prompt_logprobs`: per prompt token None (the
    first) or `{"<token id>": {"logprob", "rank", "decoded_token"}}`."""

    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    object: str = "text_completion"


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text


class ToolCallItem(msgspec.Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class ChatMessage(msgspec.Struct):
    role: str
    content: str | None = None
    tool_calls: list[ToolCallItem] = []


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    object: str = "chat.completion"


class ScoredChatCompletionResponse(ChatCompletionResponse):
    """A chat completion with vLLM's `prompt_logprobs` (the shape of
    `ScoredCompletionChoice.prompt_logprobs`), for the whole rendered prompt."""

    prompt_logprobs: list[dict[str, Any] | None] | None = None


class DeltaFunctionCall(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(msgspec.Struct, omit_defaults=True):
    """OpenAI's streamed tool call: the first delta of call `index` has its id, type and
    name; later ones add to `function.arguments`."""

    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(msgspec.Struct):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    object: str = "chat.completion.chunk"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    max_model_len: int
    object: str = "model"
    owned_by: str = "shoal"
    root: str | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo


# ----------------------------------------------------------------------------- helpers


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


_PATH = re.compile(r" - at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def validation_param(message: str) -> str | None:
    """The field a msgspec validation message (or a `"field: message"` ValueError) names.

    `"Expected int, got str - at $.max_tokens"` -> `max_tokens`;
    `"Object missing required field messages"` -> `messages`; `"top_p: must be ..."` -> `top_p`.
    """
    path = _PATH.search(message)
    missing = _MISSING.search(message)
    if path and missing:
        return f"{path.group(1)}.{missing.group(1)}"
    if path:
        return path.group(1) or None
    if missing:
        return missing.group(1)
    head, sep, _ = message.partition(":")
    if sep and re.fullmatch(r"[A-Za-z_][\w.\[\]]*", head):
        return head
    return None
