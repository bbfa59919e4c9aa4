"""The Python API: load a folder, stream decoding events, or generate text in one call.

    import nbdiff
    model, tokenizer = nbdiff.load("smollm2-nbdiff", quantize="nf4")
    for event in nbdiff.stream(model, tokenizer, "Write a haiku", block_size=8):
        ...                                   # StepEvent / BlockEvent records, then a FinalEvent
    text, final = nbdiff.generate(model, tokenizer, [{"role": "user", "content": "Hi"}], threshold=0.8)
    text, final = nbdiff.generate(model, tokenizer, "Hi", drafter="my-drafter")  # exact mode, a trained drafter

A prompt is a string, a list of chat messages, or a list of either (a batch). Strings and
message lists go through the tokenizer's chat template when it has one (`raw=True` for a plain
continuation). Decoding options come from a `DecodeOptions`, overridden by keyword arguments;
`block_size=None` means the block size the model folder was adapted to (`nbdiff.loading.default_block_size`:
1 for a converted, not yet adapted folder and for a never-converted one).

Layers (as mlx-lm's generate_step / stream_generate / generate): `nbdiff.decode.decoder.decode` knows the
model and the cache and yields token records; `stream` adds the text of every record and the
timing; `generate` collects. A `Session` keeps the KV cache between calls, so a chat's next turn
computes only the tokens its prompt adds.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator, Sequence, Union

from nbdiff.errors import NBDiffError
from nbdiff.decode.events import BlockEvent, Event, FinalEvent, StepEvent
from nbdiff.loading import context_length, dtype_name, load_model, model_settings
from nbdiff.decode.options import DecodeOptions
from nbdiff.decode.plan import DraftingPlan, plan_drafting

Message = dict
PromptLike = Union[str, Sequence[Message]]


def load(path, quantize: str | None = None, device: str = "auto", dtype: str = "auto"):
    """Load a converted (or plain) model folder. Returns (model, tokenizer)."""
    return load_model(path, quantize=quantize, device=device, dtype=dtype)


def resolve_options(model, options: DecodeOptions | None = None, **overrides: Any) -> tuple[DecodeOptions, list[str]]:
    """Options with keyword overrides applied and block_size filled from the model. Returns (options, notes)."""
    options, _, notes = resolve(model, options, **overrides)
    return options, notes


def resolve(model, options: DecodeOptions | None = None, *, plan: DraftingPlan | None = None,
            **overrides: Any) -> tuple[DecodeOptions, DraftingPlan, list[str]]:
    """`resolve_options` and the drafting plan (nbdiff.decode.plan), resolved once: `stream` passes the plan to decode().

    `plan`: one resolved earlier for these options (chat resolves before the reply for its notes and
    hands it to `stream`), so the model folder and the drafters are not looked at again."""
    options = options or DecodeOptions()
    known = set(DecodeOptions.field_names())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise NBDiffError(f"unknown decoding option(s): {', '.join(unknown)}", f"known: {', '.join(sorted(known))}")
    if overrides:
        options = options.with_(**overrides)
    settings = model_settings(model)
    notes: list[str] = []
    if plan is None:
        plan = plan_drafting(model, options)  # which drafter, which block size: decided there, once
    if options.block_size is None:
        options = options.with_(block_size=plan.block_size)
        if settings is None and not plan.trained:
            notes.append("this model was never converted: decoding as plain AR (block size 1); run `nbdiff convert` on it for block diffusion")
    if settings is None and options.block_size > 1 and not plan.trained:  # a trained drafter needs no mask token of the model's
        raise NBDiffError(
            f"--block-size {options.block_size} needs a converted model (this folder has no mask token)",
            "run `nbdiff convert SOURCE --out DIR` and pass DIR, or use --block-size 1",
        )
    if settings is not None and options.block_size > settings.adapted_block_size and not options.exact:
        notes.append(
            f"block size {options.block_size} is above the block size this model was adapted to "
            f"({settings.adapted_block_size}): expect poor text"
        )
    return options, plan, notes


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def encode(tokenizer, prompt: PromptLike, *, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids of one prompt (a string or a list of chat messages)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise NBDiffError("the prompt is empty", "pass some text with --prompt")
        messages = [{"role": "user", "content": prompt}]
    elif _is_messages(prompt):
        messages = list(prompt)
        if not any(str(m.get("content", "")).strip() for m in messages):
            raise NBDiffError("the conversation is empty", "add a message with some text")
    else:
        raise NBDiffError(
            f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}"
        )
    if system and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}] + messages
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    # plain continuation: the turns' texts one after another
    text = "\n\n".join(str(m.get("content", "")) for m in messages) if len(messages) > 1 else messages[0]["content"]
    return list(tokenizer(text)["input_ids"])


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: generation config, model config and tokenizer EOS."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


def _prompts(tokenizer, prompt_or_messages, system, raw) -> tuple[list[list[int]], bool]:
    """(token-id prompts, is_batch)."""
    value = prompt_or_messages
    if isinstance(value, str) or _is_messages(value):
        return [encode(tokenizer, value, system=system, raw=raw)], False
    if isinstance(value, (list, tuple)) and value:
        return [encode(tokenizer, p, system=system, raw=raw) for p in value], True
    raise NBDiffError("nothing to decode: the prompt list is empty", "pass a string or a list of messages")


class Session:
    """Keeps the KV cache of one conversation between `stream` calls (batch size 1).

    The next call reuses the longest cached prefix its prompt shares (a chat's earlier turns) and
    computes only the rest. The replies are those of a fresh call on the same messages: the context
    keeps keys/values for exactly the tokens it lists (`CachedContext.ids`: the prompt and the
    committed reply, never a token no pass computed), each the causal one a fresh prefill computes,
    up to the rounding of a pass of another shape. In fp32 that rounding has not changed a reply
    (tests/test_session_reuse.py, benchmarks/session_agreement.py); in 16-bit weights a near-tie
    can go the other way, and `stream` says so in a note.
    """

    def __init__(self) -> None:
        self.context = None

    def clear(self) -> None:
        self.context = None


class _Text:
    """Incremental detokenization of one row: a block's text is what its tokens add to the whole."""

    def __init__(self, detokenize: Callable[[list[int]], str]):
        self.detokenize = detokenize
        self.tokens: list[int] = []
        self.sent = ""

    def delta(self, tokens: list[int], final: bool) -> str:
        self.tokens.extend(tokens)
        full = self.detokenize(self.tokens)
        # a multi-byte character split across blocks decodes as U+FFFD until its last byte arrives
        stable = full if final else full.rstrip("\ufffd")
        new = stable[len(self.sent) :] if stable.startswith(self.sent) else stable
        self.sent = stable
        return new


def with_text(events: Iterator[Event], tokenizer, eos: Sequence[int]) -> Iterator[Event]:
    """Fill the text of the decoder's records, and the wall time of its final record."""
    start = time.perf_counter()
    eos_set = set(eos)
    texts: dict[int, _Text] = {}
    detokenize = lambda ids: tokenizer.decode([t for t in ids if t not in eos_set], skip_special_tokens=True)
    for event in events:
        if isinstance(event, StepEvent):
            event.texts = [tokenizer.decode([t]) for t in event.tokens]
        elif isinstance(event, BlockEvent):
            event.text = texts.setdefault(event.seq, _Text(detokenize)).delta(event.tokens, event.last)
        elif isinstance(event, FinalEvent):
            event.seconds = time.perf_counter() - start
            event.tokens_per_second = event.new_tokens / event.seconds if event.seconds > 0 else 0.0
            event.texts = [texts[i].sent if i in texts else "" for i in range(len(event.tokens))]
        yield event


def _fit_context(model, prompts: list[list[int]], opts: DecodeOptions, notes: list[str]) -> DecodeOptions:
    """Refuse a prompt that fills the model's context; shorten max_new_tokens to what fits (with a note)."""
    limit = context_length(model)
    longest = max(len(p) for p in prompts)
    if limit is None:
        return opts
    if longest >= limit:
        raise NBDiffError(
            f"the prompt has {longest} tokens but the model's context is {limit}",
            "shorten the prompt (in chat: /clear)",
        )
    if longest + opts.max_new_tokens > limit:
        opts = opts.with_(max_new_tokens=limit - longest)
        notes.append(f"max_new_tokens shortened to {opts.max_new_tokens} to fit the context of {limit}")
    return opts


def stream(
    model,
    tokenizer,
    prompt_or_messages,
    options: DecodeOptions | None = None,
    *,
    cancel: threading.Event | None = None,
    system: str | None = None,
    raw: bool = False,
    session: Session | None = None,
    plan: DraftingPlan | None = None,
    **overrides: Any,
) -> Iterator[Event]:
    """Decode and yield StepEvent / BlockEvent records, then one FinalEvent.

    Errors in the input (empty prompt, prompt longer than the context, bad options) are raised
    by the first `next()`; set `cancel` to stop before the next forward pass. `session` keeps the
    KV cache for the next call (one prompt at a time). `plan`: the drafting plan `resolve` gave for
    these options (None: resolved here).
    """
    from nbdiff.decode.decoder import decode

    opts, plan, notes = resolve(model, options, plan=plan, **overrides)
    prompts, _ = _prompts(tokenizer, prompt_or_messages, system, raw)
    opts = _fit_context(model, prompts, opts, notes)
    sixteen = dtype_name(model) if str(getattr(model, "dtype", "")) in ("torch.bfloat16", "torch.float16") else None
    if session is not None and sixteen:
        notes.append("a kept conversation in 16-bit weights: its cached keys/values were computed in passes of other "
                     "shapes than a fresh prefill's and round differently, so a later turn can differ from a fresh call "
                     "where two tokens nearly tie; load with dtype='fp32' for a fresh call's tokens")
    settings = model_settings(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = eos_ids(model, tokenizer)
    context = None
    if session is not None and len(prompts) == 1:
        from nbdiff.decode.context import CachedContext

        if session.context is None or session.context.model is not model:
            session.context = CachedContext(model, prompts, pad)
        context = session.context
    events = decode(
        model,
        prompts,
        opts,
        mask_token_id=settings.mask_token_id if settings is not None else -1,
        eos_token_ids=eos,
        pad_token_id=pad,
        cancel=cancel,
        context=context,
        plan=plan,
    )
    try:
        for event in with_text(events, tokenizer, eos):
            if isinstance(event, FinalEvent):
                event.notes = notes + event.notes + _near_tie_note(opts, sixteen, event)
            yield event
    except BaseException:
        if session is not None:
            session.clear()  # a run that stopped half-way may have left the cache mid-pass
        raise


def _near_tie_note(opts: DecodeOptions, sixteen: str | None, final: FinalEvent) -> list[str]:
    """Exact mode in 16-bit weights verifies in that dtype: say what its reply equals (nbdiff.decode.exact)."""
    if not opts.exact or sixteen is None:
        return []
    from nbdiff.decode.exact import NEAR_TIE_ULPS

    return [f"exact mode in {sixteen}: the reply is block size 1's in {sixteen} token for token except after a near-tie "
            f"(top two logits within {NEAR_TIE_ULPS} ulps, where the two computations may round to different tokens): "
            f"{final.near_ties} here; load with dtype='fp32' for token-identical output to fp32 AR"]


def generate(
    model,
    tokenizer,
    prompt_or_messages,
    options: DecodeOptions | None = None,
    *,
    cancel: threading.Event | None = None,
    system: str | None = None,
    raw: bool = False,
    session: Session | None = None,
    **overrides: Any,
) -> tuple[str | list[str], FinalEvent]:
    """Decode to the end. Returns (text, final record); a batch input gives a list of texts."""
    batch = not (isinstance(prompt_or_messages, str) or _is_messages(prompt_or_messages))
    final = None
    for event in stream(model, tokenizer, prompt_or_messages, options, cancel=cancel, system=system, raw=raw,
                        session=session, **overrides):
        if isinstance(event, FinalEvent):
            final = event
    assert final is not None  # decode always ends with a FinalEvent
    return (final.texts if batch else final.texts[0]), final

