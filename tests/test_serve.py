"""`nbdiff serve`: the real server on a free localhost port, spoken to by the real `openai` client.

One server per module (uvicorn in a thread, built by the command's own `build`) over a tiny
converted folder: chat and text completions, streaming, stop strings, usage, concurrent clients
against lone replies, every kind of bad input, the API key, a disconnect; then the engine alone
(queue full, time limit, mid-flight joins) and the command in a subprocess.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from nbdiff import api  # noqa: E402
from nbdiff.decode.decoder import decode  # noqa: E402
from nbdiff.decode.options import DecodeOptions  # noqa: E402
from nbdiff.serve.engine import Delta, Done, Engine, Job, QueueFull  # noqa: E402
from nbdiff.testing import ARCHITECTURES, tiny_model  # noqa: E402
from nbdiff_cli.options import DtypeChoice, Hardware  # noqa: E402
from nbdiff_cli.serve.command import bind, build  # noqa: E402
from nbdiff_cli.serve.server import MAX_BODY  # noqa: E402

KEY = "test-key-123"
NAME = "tiny"
PROMPTS = ["Hello, how are you?", "The quick brown fox", "Once upon a time", "def add(a, b):",
           "1 + 2 = 3. 12 * 4 =", "It is a truth", "I am fine, thank you.", "What is a wife?"]


@pytest.fixture(scope="module")
def served(tiny_converted):
    """(base url, engine, tokenizer) of a live server: key required, 8 rows, no queue beyond them."""
    app, engine, settings, _ = build(
        str(tiny_converted), DecodeOptions(max_new_tokens=16), Hardware(dtype=DtypeChoice.fp32), name=NAME,
        max_batch=8, max_queue=0, request_timeout=60, api_key=KEY, cors=[], log_prompts=False)
    app_settings = settings
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield url, engine, engine.tokenizer, app_settings
    server.should_exit = True
    thread.join(10)
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _chat(client, prompt, **kw):
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], **kw)


def _streamed(client, prompt, **kw):
    """(text, finish_reason, usage chunk or None) of a streamed chat reply."""
    kw.setdefault("max_tokens", 24)
    text, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                                stream=True, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def _idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return engine.stats()["active"] == 0


# ---- replies -------------------------------------------------------------------------------


def test_models_health_and_the_api_key(served, client):
    url = served[0]
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(url + "/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_chat_reply_equals_the_library_reply_with_usage_and_figures(served, client, tiny_converted):
    _, engine, tok, _ = served
    reply = _chat(client, PROMPTS[0], max_tokens=12)
    model, _ = api.load(tiny_converted, dtype="fp32")
    text, final = api.generate(model, tok, PROMPTS[0], max_new_tokens=12)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert reply.usage.prompt_tokens == len(api.encode(tok, PROMPTS[0]))
    assert reply.usage.completion_tokens == final.new_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason == ("length" if final.finish_reason == "length" else "stop")
    figures = reply.model_extra["nbdiff"]  # nbdiff's own field, which the client keeps aside
    assert figures["block_size"] == 8 and figures["forwards"] >= 2
    assert figures["tokens_per_forward"] == pytest.approx(reply.usage.completion_tokens / figures["forwards"], abs=1e-3)


def test_length_finish_counts_max_tokens(client):
    reply = _chat(client, PROMPTS[1], max_tokens=5, extra_body={"nbdiff": {"block_size": 1}})
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 5
    assert reply.model_extra["nbdiff"]["block_size"] == 1
    assert reply.model_extra["nbdiff"]["tokens_per_forward"] <= 1.0  # block size 1: one token per forward at most


def test_streamed_text_equals_the_whole_reply(client):
    for prompt in PROMPTS[:3]:
        whole = _chat(client, prompt)
        text, finish, usage = _streamed(client, prompt, stream_options={"include_usage": True})
        assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_text_completion_plain_and_streamed(client, served):
    tok = served[2]
    whole = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=10)
    assert whole.object == "text_completion" and whole.usage.prompt_tokens == len(tok("Once upon a time")["input_ids"])
    parts = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="Once upon a time",
                                                                    max_tokens=10, stream=True) if c.choices]
    assert "".join(parts) == whole.choices[0].text
    ids = tok("Once upon a time")["input_ids"]  # a prompt of token ids is the same prompt
    assert client.completions.create(model=NAME, prompt=ids, max_tokens=10).choices[0].text == whole.choices[0].text


def test_stop_strings_end_the_reply_without_the_stop_text(client):
    full = _chat(client, PROMPTS[1], max_tokens=24).choices[0].message.content
    start = next(k for k in range(3, len(full) - 3) if full[k:k + 3].strip() and full.find(full[k:k + 3]) == k)
    stop = full[start:start + 3]  # the first time these three characters appear in the reply
    cut = _chat(client, PROMPTS[1], max_tokens=24, stop=[stop, "never-appears"])
    assert cut.choices[0].message.content == full[:start] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= 24
    text, finish, _ = _streamed(client, PROMPTS[1], max_tokens=24, stop=stop)
    assert text == full[:start] and finish == "stop"


def test_eight_concurrent_greedy_clients_get_their_lone_replies(served, client):
    engine = served[1]
    assert _idle(engine)
    alone = [_chat(client, p, max_tokens=32).choices[0].message.content for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _chat(client, p, max_tokens=32).choices[0].message.content, PROMPTS))
    assert together == alone
    assert engine.stats()["peak_active"] >= 2  # they did share the batch


# ---- bad input -----------------------------------------------------------------------------

GOOD = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD = [
    ("chat", b"{not json", 400),
    ("chat", b"[1, 2]", 400),
    ("chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400),
    ("chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "top_p": Infinity}', 400),
    ("chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": 1e999}', 400),
    ("chat", {"messages": GOOD["messages"]}, 400),  # no model
    ("chat", {"model": NAME}, 400),  # no messages
    ("chat", {**GOOD, "model": "gpt-4o"}, 404),
    ("chat", {**GOOD, "messages": "Hi"}, 400),
    ("chat", {**GOOD, "messages": []}, 400),
    ("chat", {**GOOD, "messages": [{"role": "wizard", "content": "Hi"}]}, 400),
    ("chat", {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("chat", {**GOOD, "temperature": "hot"}, 400),
    ("chat", {**GOOD, "temperature": 5}, 400),
    ("chat", {**GOOD, "max_tokens": -3}, 400),
    ("chat", {**GOOD, "max_tokens": 0}, 400),
    ("chat", {**GOOD, "max_tokens": 10**12}, 400),
    ("chat", {**GOOD, "max_tokens": 4.5}, 400),
    ("chat", {**GOOD, "max_completion_tokens": True}, 400),
    ("chat", {**GOOD, "seed": "7"}, 400),
    ("chat", {**GOOD, "stop": [1, 2]}, 400),
    ("chat", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("chat", {**GOOD, "stop": "x" * 5000}, 400),
    ("chat", {**GOOD, "stream": "yes"}, 400),
    ("chat", {**GOOD, "stream_options": {"include_usage": True}}, 400),  # without stream
    ("chat", {**GOOD, "n": 2}, 400),
    ("chat", {**GOOD, "logprobs": True}, 400),
    ("chat", {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("chat", {**GOOD, "frobnicate": 1}, 400),
    ("chat", {**GOOD, "nbdiff": {"block_size": 3}}, 400),
    ("chat", {**GOOD, "nbdiff": {"drafter": "/etc/passwd"}}, 400),
    ("chat", {**GOOD, "nbdiff": {"threshold": 0}}, 400),
    ("chat", {**GOOD, "nbdiff": {"warp": 9}}, 400),
    ("chat", {**GOOD, "messages": [{"role": "user", "content": "the fox " * 400}]}, 400),  # longer than the context
    ("completion", {"model": NAME, "prompt": ""}, 400),
    ("completion", {"model": NAME, "prompt": ["a", "b"]}, 400),
    ("completion", {"model": NAME, "prompt": [10**9]}, 400),
    ("completion", {"model": NAME, "prompt": "Hi", "echo": True}, 400),
    ("completion", {"model": NAME, "prompt": "Hi", "best_of": 3}, 400),
    ("completion", {"model": NAME}, 400),
]


@pytest.mark.parametrize("route,body,status", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_gets_openai_error_json_and_the_server_keeps_serving(served, route, body, status):
    url = served[0] + ("/v1/chat/completions" if route == "chat" else "/v1/completions")
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url, content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    after = httpx.post(served[0] + "/v1/chat/completions", json=GOOD, headers=headers, timeout=30)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["role"] == "assistant"


def test_oversized_body_unknown_route_and_wrong_method_answer_in_the_same_shape(served):
    url, headers = served[0], {"Authorization": f"Bearer {KEY}"}
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}
    r = httpx.post(url + "/v1/chat/completions", json=big, headers=headers, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for r in (httpx.get(url + "/v1/nothing", headers=headers), httpx.get(url + "/v1/chat/completions", headers=headers)):
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_full_server_answers_429_with_retry_after(served):
    url, engine = served[0], served[1]
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {**GOOD, "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=30) as http:
        streams = [http.stream("POST", url + "/v1/chat/completions", json=long, headers=headers) for _ in range(8)]
        responses = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in responses)
            r = http.post(url + "/v1/chat/completions", json=GOOD, headers=headers)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert _idle(engine)
    assert httpx.get(url + "/v1/models", headers=headers).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_row(served):
    url, engine = served[0], served[1]
    assert _idle(engine)
    before = engine.stats()["cancelled"]
    body = {**GOOD, "max_tokens": 480, "stream": True, "nbdiff": {"block_size": 1}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        next(r.iter_lines())  # the first chunk: the request holds a row now
    assert _idle(engine)
    assert engine.stats()["cancelled"] == before + 1  # freed by the disconnect, not by finishing


# ---- the engine alone ----------------------------------------------------------------------


def _collect(engine, job):
    items = queue.Queue()
    engine.submit(job, items.put)
    text = ""
    while True:
        item = items.get(timeout=30)
        if isinstance(item, Delta):
            text += item.text
        else:
            return text, item


@pytest.mark.parametrize("mergeable", [True, False], ids=["rows-merged", "lanes-side-by-side"])
def test_requests_joining_mid_flight_with_other_settings_or_seeded_sampling_equal_their_lone_replies(
        served, tiny_converted, monkeypatch, mergeable):
    # not mergeable: what a sliding-window cache or a trained drafter's own cache gets (rows stay in
    # place until their lane ends; newcomers start lanes of their own)
    if not mergeable:
        monkeypatch.setattr("nbdiff.serve.lane.can_merge", lambda ctx: False)
    tok = served[2]
    model, _ = api.load(tiny_converted, dtype="fp32")
    engine = Engine(model, tok, max_batch=8).start()
    try:
        settings = [dict(block_size=8, threshold=0.5, max_new_tokens=13), dict(block_size=4, exact=True, max_new_tokens=11),
                    dict(block_size=8, sub_blocks=2, threshold=0.05, max_new_tokens=20),
                    dict(block_size=8, threshold=0.5, max_new_tokens=13, temperature=1.0, top_p=0.9)]  # seeded sampling
        jobs, alone = [], []
        for k, prompt in enumerate(PROMPTS):
            options, _ = api.resolve_options(model, DecodeOptions(**settings[k % 4], seed=k))
            jobs.append(Job(api.encode(tok, prompt), options))
            alone.append(api.generate(model, tok, prompt, options)[0])
        results = [None] * len(jobs)

        def run(k):
            time.sleep(0.004 * k)  # arrive while the others decode
            results[k] = _collect(engine, jobs[k])

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert [r[0] for r in results] == alone
        assert all(r[1].finish_reason in ("stop", "length") for r in results)
    finally:
        engine.close()


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_packed_block_size_one_requests_join_in_the_running_forward_and_equal_their_lone_replies(
        served, tiny_converted, prefix_cache):
    tok = served[2]
    model, _ = api.load(tiny_converted, dtype="fp32")
    engine = Engine(model, tok, max_batch=8, prefix_cache_bytes=(64 << 20) if prefix_cache else 0).start()
    try:
        jobs, alone = [], []
        for k, prompt in enumerate(PROMPTS):
            sampled = dict(temperature=1.0, top_p=0.9, seed=k) if k % 3 == 2 else {}  # seeded sampling rows too
            options, _ = api.resolve_options(model, DecodeOptions(block_size=1, max_new_tokens=9 + 3 * k, **sampled))
            jobs.append(Job(api.encode(tok, prompt), options))
            alone.append(api.generate(model, tok, prompt, options)[0])
        results = [None] * len(jobs)

        def run(k):
            time.sleep(0.003 * k)  # arrive while the others decode; rows leave at different steps
            results[k] = _collect(engine, jobs[k])

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert [r[0] for r in results] == alone
        for _, done in results:  # a joining prompt rides in a running forward: one forward per token, no prefill of its own
            assert done.block_size == 1 and done.forwards == done.completion_tokens
        assert engine.stats()["peak_active"] >= 2
        assert ("prefix_cache_hits" in engine.stats()) == prefix_cache
    finally:
        engine.close()


@pytest.mark.parametrize("arch,impl", [(a, "sdpa") for a in ARCHITECTURES] + [("llama", "eager")])
def test_packed_rows_decode_as_they_would_alone_on_every_architecture(arch, impl):
    from nbdiff.serve.packed import PackedLane
    from nbdiff.serve.prefixes import usable

    model = tiny_model(arch, attn_implementation=impl)
    if not usable(model):
        pytest.skip(f"{arch}: sliding-window cache layers, served by per-row lanes")
    options = DecodeOptions(block_size=1, max_new_tokens=10)
    prompts = [[5, 17, 33, 80, 12, 7, 99], [40, 41], [300, 12, 9, 9, 61, 3, 3, 8, 21]]
    lane = PackedLane(model, prompts[:1], [options], [0], eos_token_ids=[], prefill_chunk=4)
    got, compacted = {0: []}, False
    for step in range(40):
        if step in (2, 5):  # the others join while row 0 decodes
            lane.admit([prompts[len(got)]], [options], [len(got)])
            got[len(got)] = []
        for i, record in lane.run_block().items():
            got[lane.owners[i]] += record.tokens
        before = len(lane.owner_of)
        lane.release([i for i in range(lane.size) if lane.done(i)])
        compacted = compacted or (lane.size > 0 and len(lane.owner_of) < before)  # dead columns dropped, others kept
        if not lane.size:
            break
    assert compacted
    for k, prompt in enumerate(prompts):
        alone = list(decode(model, [prompt], options, mask_token_id=-1, eos_token_ids=[]))[-1].tokens[0]
        assert got[k] == alone, (arch, k)


def test_a_long_prompt_joins_in_chunks_while_the_others_keep_decoding(served, tiny_converted):
    from nbdiff.serve.packed import PackedLane

    tok = served[2]
    model, _ = api.load(tiny_converted, dtype="fp32")
    options, _ = api.resolve_options(model, DecodeOptions(block_size=1, max_new_tokens=12))
    short = api.encode(tok, PROMPTS[0])
    long = api.encode(tok, " ".join(PROMPTS) * 2)
    assert 40 < len(long) < 8 * 40
    keeps_going = replace(options, max_new_tokens=48)
    lane = PackedLane(model, [short], [keeps_going], ["short"], eos_token_ids=[], prefill_chunk=8)
    first = {}
    while not first:  # its own prompt goes in 8 tokens at a time too
        first = lane.run_block()
    got = {0: first[0].tokens}
    lane.admit([long], [options], ["long"])
    steps_in = 0
    while 1 not in got:  # the long prompt enters 8 tokens per forward; the short row gets a token every time
        records = lane.run_block()
        steps_in += 1
        assert 0 in records
        got[0] += records[0].tokens
        got[1] = records[1].tokens if 1 in records else None
        if got[1] is None:
            del got[1]
    assert steps_in == -(-len(long) // 8)
    while not (lane.done(0) and lane.done(1)):
        for i, record in lane.run_block().items():
            got[i] += record.tokens
    for i, (prompt, o) in enumerate([(short, keeps_going), (long, options)]):
        final = list(decode(model, [prompt], o, mask_token_id=-1, eos_token_ids=[]))[-1]
        assert got[i] == final.tokens[0]


def test_the_prefix_cache_reuses_shared_starts_and_whole_conversations(served, tiny_converted):
    tok = served[2]
    model, _ = api.load(tiny_converted, dtype="fp32")
    system = [{"role": "system", "content": "You answer in one short sentence about tea, trains or the sea."}]
    questions = ["Why is the sea salty?", "What is a train?", "Is green tea bitter?"]
    for settings in (dict(block_size=1), dict(block_size=8), dict(block_size=4, exact=True)):  # packed; batch rows
        engine = Engine(model, tok, max_batch=8, prefix_cache_bytes=64 << 20).start()
        try:
            options, _ = api.resolve_options(model, DecodeOptions(max_new_tokens=12, **settings))
            first = [api.encode(tok, system + [{"role": "user", "content": q}]) for q in questions]
            shared = len(os.path.commonprefix(first))
            replies = [_collect(engine, Job(ids, options))[0] for ids in first]
            stats = engine.stats()
            assert stats["prefix_cache_hits"] == 2 and stats["prefix_cache_reused_tokens"] >= 2 * (shared - 1)
            assert replies == [api.generate(model, tok, system + [{"role": "user", "content": q}], options)[0] for q in questions]
            # the next turn of the first conversation starts with all of its first turn
            turn = system + [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": replies[0]},
                             {"role": "user", "content": "And the rivers?"}]
            before = engine.stats()["prefix_cache_reused_tokens"]
            again = _collect(engine, Job(api.encode(tok, turn), options))[0]
            assert engine.stats()["prefix_cache_reused_tokens"] - before > len(first[0]) - 1
            assert again == api.generate(model, tok, turn, options)[0]
        finally:
            engine.close()


@pytest.mark.parametrize("settings", [dict(block_size=1), dict(block_size=8, threshold=0.5),
                                      dict(block_size=4, exact=True, drafter="ngram")], ids=["b1", "b8", "exact"])
def test_three_turns_through_the_prefix_cache_equal_a_server_without_it_and_fresh_calls(served, tiny_converted, settings):
    """Issue 29: each turn of a conversation, its earlier turns served from the prefix cache, is the reply of an
    engine with --prefix-cache 0 and of a fresh library call on the same messages (text and token count)."""
    tok = served[2]
    model, _ = api.load(tiny_converted, dtype="fp32")
    options, _ = api.resolve_options(model, DecodeOptions(max_new_tokens=12, **settings))
    cached, plain = (Engine(model, tok, max_batch=4, prefix_cache_bytes=size).start() for size in (64 << 20, 0))
    try:
        messages = []
        for k, question in enumerate(["Why is the sea salty?", "And the rivers?", "Once upon a time"]):
            messages.append({"role": "user", "content": question})
            ids = api.encode(tok, messages)
            before = cached.stats()["prefix_cache_reused_tokens"]
            text, done = _collect(cached, Job(ids, options))
            assert (cached.stats()["prefix_cache_reused_tokens"] > before) == (k > 0), k  # later turns reuse
            text_plain, done_plain = _collect(plain, Job(ids, options))
            fresh_text, fresh = api.generate(model, tok, messages, options)
            assert text == text_plain == fresh_text, k
            assert done.completion_tokens == done_plain.completion_tokens == fresh.new_tokens, k
            messages.append({"role": "assistant", "content": text})
    finally:
        cached.close()
        plain.close()


def test_prefix_cache_entries_keep_the_longest_and_stay_within_the_budget():
    from nbdiff.serve.prefixes import PrefixCache

    def kv(n, layers=2):
        return [(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)) for _ in range(layers)]

    one = kv(10)[0][0].numel() * 4 * 2 * 2  # bytes of a 10-token entry
    cache = PrefixCache(max_bytes=3 * one, min_tokens=4)
    cache.store(tuple(range(6)), kv(6))
    cache.store(tuple(range(10)), kv(10))  # the longer one replaces its start
    assert list(cache.entries) == [tuple(range(10))]
    cache.store(tuple(range(8)), kv(8))  # already held inside the longer one
    assert len(cache.entries) == 1
    hit = cache.lookup([0, 1, 2, 3, 4, 5, 99])
    assert hit.tokens == (0, 1, 2, 3, 4, 5) and hit.layers[0][0].shape == (1, 2, 6, 4)
    assert cache.lookup(list(range(10))).tokens == tuple(range(9))  # one prompt token is always left to forward
    assert cache.lookup([0, 1, 2, 7]) is None  # shorter than min_tokens
    for start in (100, 200, 300):
        cache.store(tuple(range(start, start + 10)), kv(10))
    assert cache.bytes <= 3 * one and tuple(range(10)) not in cache.entries  # least recently used went first


def test_grouped_heads_under_a_mask_match_repeated_heads():
    # what `nbdiff serve` relies on when it sets TRANSFORMERS_SDPA_FORCE_GQA on the CPU
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 6, 9, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    mask = torch.rand(1, 1, 9, 30, generator=g) > 0.4
    mask[..., 0] = True
    grouped = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    repeated = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    torch.testing.assert_close(grouped, repeated)


def test_full_queue_and_time_limit(served, tiny_converted):
    tok = served[2]
    model, _ = api.load(tiny_converted, dtype="fp32")
    engine = Engine(model, tok, max_batch=1, max_queue=1).start()
    try:
        options, _ = api.resolve_options(model, DecodeOptions(block_size=1, max_new_tokens=400))
        ids = api.encode(tok, PROMPTS[0])
        first, second = queue.Queue(), queue.Queue()
        ticket = engine.submit(Job(ids, options), first.put)
        engine.submit(Job(ids, options, time_limit=0.0), second.put)  # waits, and is past its limit at once
        with pytest.raises(QueueFull) as refused:
            engine.submit(Job(ids, options), lambda item: None)
        assert refused.value.retry_after >= 1
        ticket.cancel()
        waited = second.get(timeout=30)
        assert isinstance(waited, Done) and waited.finish_reason == "error" and "time limit" in waited.error
        text, done = _collect(engine, Job(ids, options, time_limit=0.05))  # decodes past its limit: ends with what it has
        assert done.finish_reason == "length" and done.timed_out and 0 < done.completion_tokens < 400
    finally:
        engine.close()


# ---- the command ---------------------------------------------------------------------------


def test_the_command_serves_with_the_key_from_the_environment(tiny_converted):
    env = {**os.environ, "NBDIFF_API_KEY": "env-key", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nbdiff_cli.app", "serve", str(tiny_converted), "--port", "0",
                             "--max-new-tokens", "4", "--prefix-cache", "0"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "the command did not say where it serves"
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url.removesuffix("/v1") + "/health")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert httpx.get(url + "/models").status_code == 401
        health = httpx.get(url.removesuffix("/v1") + "/health").json()
        assert health["status"] == "ok" and not any(k.startswith("prefix_cache") for k in health)  # --prefix-cache 0
        name = os.path.basename(str(tiny_converted))
        reply = openai.OpenAI(base_url=url, api_key="env-key", max_retries=0).chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.completion_tokens <= 4
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_command_refuses_a_negative_prefix_cache_in_one_line(tiny_converted):
    out = subprocess.run([sys.executable, "-m", "nbdiff_cli.app", "serve", str(tiny_converted), "--port", "0",
                          "--prefix-cache", "-1"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "--prefix-cache" in lines[0] and "Traceback" not in out.stderr
