"""OpenAI's chat and text completion requests in, engine jobs out; replies and chunks back in OpenAI's shape.

Plain Python over parsed JSON (no web framework): the web layer (nbdiff_cli.serve) reads the body,
calls `parse_json` and `chat_request` / `completion_request`, submits the job, and builds its
replies with `reply` and `chunk`. Every refusal is an `APIError` that carries OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`) and its HTTP status.

Notable choices:
- Strict like OpenAI: an unknown field, a wrong type, NaN or an infinite number, a value out of
  range or a parameter nbdiff does not implement (n > 1, logprobs, tools, ...) is a 400 naming the
  field. Fields that change nothing here (user, metadata, ...) are accepted.
- A field left out takes the server's default (its decoding flags): greedy unless the server was
  started with a temperature.
- max_tokens (or max_completion_tokens) must fit the model's context beside the prompt; left out,
  the reply may use the server's --max-new-tokens or what the context leaves, whichever is less.
- nbdiff's own settings ride in an `nbdiff` object (`extra_body={"nbdiff": {...}}` in the openai
  client) and the reply carries `nbdiff` figures (tokens per forward, forwards, block size), a field
  OpenAI clients ignore.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from nbdiff.api import encode, resolve_options
from nbdiff.decode.options import CONFIDENCE_RULES, DecodeOptions
from nbdiff.errors import NBDiffError
from nbdiff.serve.engine import Done, Job

MAX_STOPS = 4
MAX_STOP_CHARS = 1000
SEED_RANGE = (-(2**63), 2**64 - 1)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options", "nbdiff"}
IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
# fields accepted only at the value that means "off" (OpenAI's default); anything else is unsupported
OFF_ONLY = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False,),
    "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},), "modalities": (["text"],),
    "echo": (False,), "suffix": ("",), "best_of": (1,),
}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_OFF = set(OFF_ONLY) - {"echo", "suffix", "best_of"}
COMPLETION_OFF = {"frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "echo", "suffix", "best_of"}
NBDIFF_FIELDS = {"block_size": int, "sub_blocks": int, "threshold": float, "confidence": str, "top_k": int,
                 "exact": bool, "draft_steps": int, "drafter": str}
NBDIFF_DRAFTERS = ("auto", "diffusion", "ngram")  # never a path: a request does not name folders on the server


class APIError(Exception):
    """A refused request: HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ServerSettings:
    """What the server decides for every request."""

    model_id: str
    defaults: DecodeOptions
    """The server's decoding flags (block_size resolved from the model)."""
    context: int | None
    """The model's context length in tokens (None = unknown)."""
    time_limit: float | None = None
    """Seconds a request may take, queue included."""
    created: int = 0


@dataclass
class Request:
    """A parsed request: the job for the engine and how to answer."""

    kind: str
    """'chat' or 'completion'."""
    job: Job
    stream: bool
    include_usage: bool
    id: str


# ---- JSON and field checks -----------------------------------------------------------------


def _not_finite(value: str):
    raise APIError(400, f"the body holds {value}, which is not a number JSON allows", code="invalid_json")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as an object; malformed JSON, NaN or an infinite number is a 400."""
    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            _not_finite(text)
        return value

    try:
        body = json.loads(raw, parse_constant=_not_finite, parse_float=finite)
    except APIError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}


def _type_name(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def field(body: dict, name: str, kind: type, default: Any = None, *, low=None, high=None, param: str | None = None):
    """body[name] checked: its type, finite, within [low, high]; `default` when absent or null."""
    value = body.get(name)
    param = param or name
    if value is None:
        return default
    if not _is(value, kind):
        raise APIError(400, f"invalid type for '{param}': expected {_TYPE_NAMES[kind]}, got {_type_name(value)}",
                       param, "invalid_type")
    if kind is float and not math.isfinite(value):
        raise APIError(400, f"'{param}' must be a finite number", param, "invalid_value")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"between {low} and {high}" if low is not None and high is not None else \
            (f">= {low}" if low is not None else f"<= {high}")
        raise APIError(400, f"'{param}' must be {span}, got {value}", param, "invalid_value")
    return value


def _check_fields(body: dict, allowed: set[str], off_only: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in IGNORED:
            continue
        if name in off_only:
            if value is None or any(value == off and type(value) is type(off) for off in OFF_ONLY[name]):
                continue
            raise APIError(400, f"'{name}' is not supported by nbdiff serve (leave it out)", name, "unsupported_parameter")
        raise APIError(400, f"unrecognized request argument: '{name}'", name, "unknown_parameter")


# ---- requests ------------------------------------------------------------------------------


def _model(body: dict, settings: ServerSettings) -> None:
    name = body.get("model")
    if name is None:
        raise APIError(400, "'model' is required", "model", "missing_required_parameter")
    if not isinstance(name, str):
        raise APIError(400, f"invalid type for 'model': expected a string, got {_type_name(name)}", "model", "invalid_type")
    if name != settings.model_id:
        raise unknown_model(name, settings)


def unknown_model(name: str, settings: ServerSettings) -> APIError:
    return APIError(404, f"the model '{name}' does not exist here; this server serves '{settings.model_id}'",
                    "model", "model_not_found")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"'stop' takes 1 to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters",
                       "stop", "invalid_value")
    return tuple(stops)


def _stream(body: dict) -> tuple[bool, bool]:
    stream = field(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options", "invalid_value")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise APIError(400, "'stream_options' takes only 'include_usage'", "stream_options", "invalid_value")
    return stream, field(options, "include_usage", bool, False, param="stream_options.include_usage")


def _nbdiff_options(body: dict, options: DecodeOptions) -> DecodeOptions:
    extra = body.get("nbdiff")
    if extra is None:
        return options
    if not isinstance(extra, dict):
        raise APIError(400, "'nbdiff' must be an object of decoding settings", "nbdiff", "invalid_type")
    for name, value in extra.items():
        param = f"nbdiff.{name}"
        if name not in NBDIFF_FIELDS:
            raise APIError(400, f"unknown nbdiff setting '{name}' (known: {', '.join(NBDIFF_FIELDS)})", param, "unknown_parameter")
        value = field(extra, name, NBDIFF_FIELDS[name], param=param)
        if name == "drafter" and value not in NBDIFF_DRAFTERS:
            raise APIError(400, f"'{param}' must be one of {', '.join(NBDIFF_DRAFTERS)}", param, "invalid_value")
        if name == "confidence" and value not in CONFIDENCE_RULES:
            raise APIError(400, f"'{param}' must be one of {', '.join(CONFIDENCE_RULES)}", param, "invalid_value")
        if value is not None:
            options = _with(options, name, value, param)
    return options


def _with(options: DecodeOptions, name: str, value: Any, param: str) -> DecodeOptions:
    try:
        return options.with_(**{name: value})
    except NBDiffError as exc:  # the library names its flags (--top-p); a request names fields
        message = exc.message.replace("--" + name.replace("_", "-"), f"'{param}'")
        raise APIError(400, message, param, "invalid_value") from None


def _options(body: dict, settings: ServerSettings, model, budget: tuple[str, int | None], prompt: tuple[str, int]):
    """The request's DecodeOptions: server defaults, then the OpenAI fields, then nbdiff's."""
    o = settings.defaults
    temperature = field(body, "temperature", float, None, low=0, high=2)
    top_p = field(body, "top_p", float, None, low=0, high=1)
    if top_p is not None and top_p == 0:
        raise APIError(400, "'top_p' must be above 0 (use temperature 0 for greedy replies)", "top_p", "invalid_value")
    seed = field(body, "seed", int, None, low=SEED_RANGE[0], high=SEED_RANGE[1])
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None:
            o = _with(o, name, float(value), name)
    if seed is not None:
        o = replace(o, seed=seed % 2**64)
    o = _nbdiff_options(body, o)
    try:
        o, _ = resolve_options(model, o)
    except NBDiffError as exc:
        raise APIError(400, exc.message + (f" ({exc.hint})" if exc.hint else ""), "nbdiff", "invalid_value") from None
    return replace(o, max_new_tokens=_budget(settings, *budget, *prompt))


def _budget(settings: ServerSettings, name: str, asked: int | None, prompt_param: str, prompt_len: int) -> int:
    """Tokens the reply may take: as asked when it fits the context beside the prompt."""
    limit = settings.context
    if limit is not None and prompt_len >= limit:
        raise APIError(400, f"the prompt has {prompt_len} tokens but the model's context is {limit}; shorten it",
                       prompt_param, "context_length_exceeded")
    room = limit - prompt_len if limit is not None else None
    if asked is None:
        return min(settings.defaults.max_new_tokens, room) if room is not None else settings.defaults.max_new_tokens
    if room is not None and asked > room:
        raise APIError(400, f"'{name}' is {asked}, but the model's context of {limit} tokens leaves {room} beside the "
                       f"prompt's {prompt_len}", name, "context_length_exceeded")
    return asked


def _max_tokens(body: dict, *names: str) -> tuple[str, int | None]:
    found = [(n, field(body, n, int, None, low=1)) for n in names]
    given = [(n, v) for n, v in found if v is not None]
    return given[0] if given else (names[0], None)


def _n(body: dict) -> None:
    n = field(body, "n", int, 1)
    if n != 1:
        raise APIError(400, f"only n=1 is supported, got {n}", "n", "unsupported_value")


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                               where, "unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"invalid type for '{where}': expected a string or an array of text parts, "
                        f"got {_type_name(content)}", where, "invalid_type")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content} objects", "messages", "invalid_type")
    out = []
    for k, message in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(message, dict):
            raise APIError(400, f"'{where}' must be an object, got {_type_name(message)}", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role",
                           "invalid_value")
        if set(message) - {"role", "content", "name"}:
            extra = sorted(set(message) - {"role", "content", "name"})[0]
            raise APIError(400, f"'{where}.{extra}' is not supported by nbdiff serve", f"{where}.{extra}",
                           "unsupported_parameter")
        out.append({"role": ROLES[role], "content": _text_of(message.get("content"), f"{where}.content")})
    return out


def _encode(tokenizer, prompt, raw: bool, param: str) -> list[int]:
    try:
        return encode(tokenizer, prompt, raw=raw)
    except NBDiffError as exc:
        raise APIError(400, exc.message, param, "invalid_value") from None
    except Exception as exc:  # noqa: BLE001 - a chat template may refuse an order of roles
        raise APIError(400, f"the chat template refused these messages: {exc}", param, "invalid_value") from None


def _prompt_ids(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return _encode(tokenizer, prompt, True, "prompt")
    if isinstance(prompt, list) and prompt and all(_is(t, int) for t in prompt):
        if not all(0 <= t < len(tokenizer) for t in prompt):
            raise APIError(400, f"'prompt' holds token ids outside the vocabulary (0..{len(tokenizer) - 1})",
                           "prompt", "invalid_value")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, "one prompt per request is supported (send the others as their own requests)",
                       "prompt", "unsupported_value")
    raise APIError(400, "'prompt' must be a non-empty string or an array of token ids", "prompt", "invalid_type")


def chat_request(body: dict, settings: ServerSettings, model, tokenizer) -> Request:
    """A /v1/chat/completions body as a job; APIError when it is refused."""
    _check_fields(body, CHAT_FIELDS, CHAT_OFF)
    _model(body, settings)
    _n(body)
    stream, usage = _stream(body)
    budget = _max_tokens(body, "max_completion_tokens", "max_tokens")
    ids = _encode(tokenizer, _messages(body), False, "messages")
    options = _options(body, settings, model, budget, ("messages", len(ids)))
    job = Job(ids, options, _stop(body), settings.time_limit)
    return Request("chat", job, stream, usage, "chatcmpl-" + secrets.token_hex(12))


def completion_request(body: dict, settings: ServerSettings, model, tokenizer) -> Request:
    """A /v1/completions body as a job; APIError when it is refused."""
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_OFF)
    _model(body, settings)
    _n(body)
    stream, usage = _stream(body)
    budget = _max_tokens(body, "max_tokens")
    ids = _prompt_ids(body, tokenizer)
    options = _options(body, settings, model, budget, ("prompt", len(ids)))
    job = Job(ids, options, _stop(body), settings.time_limit)
    return Request("completion", job, stream, usage, "cmpl-" + secrets.token_hex(12))


# ---- replies -------------------------------------------------------------------------------


def usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def figures(done: Done) -> dict[str, Any]:
    """nbdiff's own figures of one reply (a field OpenAI clients ignore)."""
    return {"tokens_per_forward": round(done.tokens_per_forward, 4), "forwards": done.forwards,
            "block_size": done.block_size, "seconds": round(done.seconds, 4),
            "queued_seconds": round(done.queued_seconds, 4), "timed_out": done.timed_out}


def _envelope(request: Request, settings: ServerSettings, chunk: bool) -> dict[str, Any]:
    kind = {("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk"}.get(
        (request.kind, chunk), "text_completion")
    return {"id": request.id, "object": kind, "created": int(time.time()), "model": settings.model_id,
            "system_fingerprint": "nbdiff"}


def reply(request: Request, settings: ServerSettings, text: str, done: Done) -> dict[str, Any]:
    """The whole reply of a request that did not stream."""
    if request.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": done.finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
    return {**_envelope(request, settings, False), "choices": [choice], "usage": usage(done), "nbdiff": figures(done)}


def chunk(request: Request, settings: ServerSettings, text: str | None = None, done: Done | None = None,
          role: bool = False, usage_only: bool = False) -> dict[str, Any]:
    """One streamed chunk: the first (role), text, the last (finish reason), or the usage chunk."""
    out = _envelope(request, settings, True)
    if usage_only and done is not None:
        return {**out, "choices": [], "usage": usage(done), "nbdiff": figures(done)}
    finish = done.finish_reason if done is not None else None
    if request.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    out["choices"] = [choice]
    if done is not None and not request.include_usage:
        out["nbdiff"] = figures(done)
    return out


def models(settings: ServerSettings) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(settings)]}


def model_card(settings: ServerSettings) -> dict[str, Any]:
    return {"id": settings.model_id, "object": "model", "created": settings.created, "owned_by": "nbdiff"}
