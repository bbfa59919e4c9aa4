"""An lm-evaluation-harness model backed by nbdiff, registered as `nbdiff`.

    import lm_eval, nbdiff.eval.harness
    lm = nbdiff.eval.harness.NBDiffLM(pretrained="smollm2-nbdiff", block_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])
    lm.speed()        # tokens per forward and tokens/s of what the evaluation ran

Notable features:
- Log-likelihoods are exact: the model stays an AR model, so one causal (block size 1) forward
  scores a whole continuation. Batches are left-padded with the decoder's own mask rules
  (`nbdiff.method.masks`), so a row's scores do not depend on what it was batched with.
- `generate_until` runs the same decoder as `generate` and `chat` (`nbdiff.api.stream`) with any
  decoding option; stop strings cut the text at the earliest one and cancel decoding as soon as
  every row of a batch has produced one (or EOS).
- Speed is counted as the decoder counts it (tokens per forward, tokens/s) and lands in the
  results' `config` through `get_model_info`.

Importing this module imports lm_eval (heavy), so `import nbdiff` never does; `nbdiff eval`
and tests import it on demand. lm-eval's own CLI does not discover models from other packages:
`python -m nbdiff.eval.harness run --model nbdiff --model_args pretrained=DIR --tasks ...` is
lm-eval's CLI with this model registered.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from nbdiff.errors import NBDiffError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # pragma: no cover - depends on the environment
    raise NBDiffError("evaluation needs lm-eval", "pip install 'nbdiff[eval]'") from None

# lm-eval generation arguments this model understands; any other is reported in `speed()["ignored"]`
_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


@register_model("nbdiff")
class NBDiffLM(TemplateLM):
    """lm-eval model: exact log-likelihoods from one causal pass, generation through the nbdiff decoder.

    pretrained: a model folder (converted, adapted, plain or an exported adapter; whatever
    `nbdiff.load` accepts); omitted, the default model. Or pass a loaded `model` and `tokenizer`.
    Decoding options (block_size, threshold, ...) are keyword arguments named as `DecodeOptions`.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model=None,
        tokenizer=None,
        quantize: str | None = None,
        device: str | None = "auto",
        dtype: str = "auto",
        batch_size: int | str | None = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,  # lm-eval passes it; batches here have one fixed size
        **decoding: Any,
    ) -> None:
        super().__init__()
        from nbdiff.api import load, resolve_options
        from nbdiff.decode.options import DecodeOptions

        unknown = sorted(set(decoding) - set(DecodeOptions.field_names()))
        if unknown:
            raise NBDiffError(
                f"unknown model argument(s): {', '.join(unknown)}",
                f"decoding options are: {', '.join(DecodeOptions.field_names())}",
            )
        if model is None:
            if not pretrained:  # the default model, built on first use
                from nbdiff.default_model import ensure_default_model

                pretrained = str(ensure_default_model())
            device = "auto" if device in (None, "") else str(device).split(":")[0]  # lm-eval says cuda:0
            quantize = None if quantize in (None, "", "none") else quantize
            model, tokenizer = load(pretrained, quantize=quantize, device=device, dtype=dtype)
        elif tokenizer is None:
            raise NBDiffError("NBDiffLM(model=...) needs the tokenizer too", "pass tokenizer=...")
        self._model, self.tokenizer = model, tokenizer
        self.options, self.notes = resolve_options(model, DecodeOptions(**decoding))
        self.batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)
        self.pretrained = str(pretrained) if pretrained is not None else getattr(model.config, "_name_or_path", "")
        self._adds_bos = _adds_bos(tokenizer)
        self._counts = {"generated_tokens": 0, "forwards": 0, "generate_seconds": 0.0, "generate_requests": 0,
                        "scored_tokens": 0, "score_forwards": 0, "score_seconds": 0.0}
        self._ignored: set[str] = set()

    # --- what lm-eval asks of a model ------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._model.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # what an empty context is replaced with (lm-eval's hf model: BOS, else EOS)
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return int(getattr(self._model.config, "max_position_embeddings", None) or 2048)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            # the tokenizer's own default, unless the text already starts with BOS (chat templates)
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict:
        """Added to the results' `config` by lm-eval after the run: decoding options and speed."""
        return {"nbdiff_pretrained": self.pretrained, "nbdiff_decoding": self.options.to_dict(),
                "nbdiff_speed": self.speed()}

    # --- log-likelihoods: one causal pass -------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) | None, context ids, continuation ids) -> (log p, is greedy)."""
        limit = self.max_length
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise NBDiffError("lm-eval asked to score an empty continuation")
            whole = (list(ctx) + list(cont))[-(limit + 1):]
            rows.append((whole[:-1], whole[-len(cont):]))  # inputs, targets = the last len(cont) tokens
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: less padding
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            logprobs = self.causal_logprobs([rows[i][0] for i in chunk])  # [B, W, V]
            for r, i in enumerate(chunk):
                targets = torch.tensor(rows[i][1], device=logprobs.device)  # [T]
                lp = logprobs[r, -len(targets):]  # [T, V]: row r is left-padded, so its tokens end at W
                score = float(lp.gather(1, targets[:, None]).sum())
                greedy = bool((lp.argmax(-1) == targets).all())
                results[i] = (score, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    @torch.no_grad()
    def causal_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """Log-probabilities [B, W, V] of one causal forward over left-padded token sequences.

        Position w of row i predicts token w + 1 of the padded row. The mask and positions are
        the decoder's prefill rules (`nbdiff.method.masks`), so this is block size 1 of the decoder.
        """
        from nbdiff.method.masks import decoding_mask, left_padded, to_model_mask

        start = time.perf_counter()
        width = max(len(s) for s in sequences)
        device = self._model.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        pad = torch.tensor([width - len(s) for s in sequences], device=device)  # [B]
        ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], device=device)  # [B, W]
        positions = (torch.arange(width, device=device)[None] - pad[:, None]).clamp(min=0)  # [B, W]
        mask = to_model_mask(left_padded(decoding_mask(width, 0).to(device), pad, 0), self._model)
        logits = self._model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
        out = torch.log_softmax(logits.float(), dim=-1)
        self._counts["scored_tokens"] += sum(len(s) for s in sequences)
        self._counts["score_forwards"] += 1
        self._counts["score_seconds"] += time.perf_counter() - start
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of `max_length` that score every token once."""
        totals = []
        for request in requests:
            (text,) = request.args
            windows = [
                (None, *make_disjoint_window(w))
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            total = sum(score for score, _ in self._loglikelihood_tokens(windows))
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # --- generation: the nbdiff decoder ---------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context with the nbdiff decoder; cut at the earliest stop string."""
        args = [request.args for request in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):  # one batch never mixes generation settings
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(args)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(args[i][0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self.generate_batch([args[i][0] for i in chunk], args[chunk[0]][1])
                for i, text in zip(chunk, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
        return out

    def generate_batch(self, contexts: list[str], gen_kwargs: dict | None = None) -> list[str]:
        """Continue a batch of raw texts; each result is cut at its earliest stop string."""
        from nbdiff.decode.completion import complete

        options, until = self.generation_options(gen_kwargs or {})
        texts, final = complete(self._model, self.tokenizer, [self._strip_bos(c) for c in contexts], options, until)
        self._counts["generated_tokens"] += final.new_tokens
        self._counts["forwards"] += final.forwards * len(contexts)  # row-forwards: per-sequence figures
        self._counts["generate_seconds"] += final.seconds
        self._counts["generate_requests"] += len(contexts)
        return texts

    def generation_options(self, gen_kwargs: dict) -> tuple[Any, list[str]]:
        """(DecodeOptions, stop strings) for one request's lm-eval generation arguments."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else [str(u) for u in until]
        changes: dict[str, Any] = {"max_new_tokens": int(kw.pop("max_gen_toks", None) or self.max_gen_toks)}
        do_sample, temperature = kw.pop("do_sample", None), kw.pop("temperature", None)
        if do_sample is False or temperature == 0:
            changes["temperature"] = 0.0
        elif temperature is not None:
            changes["temperature"] = float(temperature)
        elif do_sample:
            changes["temperature"] = 1.0
        for name in ("top_p", "top_k"):
            if kw.get(name) is not None:
                changes[name] = type(getattr(self.options, name))(kw.pop(name))
        self._ignored.update(k for k in kw if k not in _GEN_KWARGS)
        return self.options.with_(**changes), until

    def _strip_bos(self, context: str) -> str:
        # the raw prompt is encoded with the tokenizer's special tokens; do not add a second BOS
        bos = self.tokenizer.bos_token
        if self._adds_bos and bos and context.startswith(bos):
            return context[len(bos):]
        return context

    # --- speed -----------------------------------------------------------------------------

    def speed(self) -> dict[str, Any]:
        """What ran so far: generated tokens, tokens per forward (per sequence) and tokens/s."""
        c = self._counts
        return {
            "block_size": self.options.block_size,
            "generate_requests": c["generate_requests"],
            "generated_tokens": c["generated_tokens"],
            "tokens_per_forward": round(c["generated_tokens"] / c["forwards"], 4) if c["forwards"] else None,
            "tokens_per_second": round(c["generated_tokens"] / c["generate_seconds"], 3) if c["generate_seconds"] else None,
            "scored_tokens": c["scored_tokens"],
            "scored_tokens_per_second": round(c["scored_tokens"] / c["score_seconds"], 1) if c["score_seconds"] else None,
            "ignored_generation_arguments": sorted(self._ignored),
            "notes": list(self.notes),
        }


def _batch_size(value) -> int:
    if value in (None, "", "auto") or str(value).startswith("auto"):
        return 8  # no memory probing: a fixed, modest batch
    size = int(value)
    if size < 1:
        raise NBDiffError(f"--batch-size must be >= 1, got {size}")
    return size


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a")[:1] == [bos]


if __name__ == "__main__":  # lm-eval's own command line, with `--model nbdiff` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
