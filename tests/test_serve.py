"""``llmquant serve`` as a real subprocess on a loopback port, driven by the official openai client.

Answers are checked against llama-cpp-python's own greedy generation in this process (same
model, one thread on both sides, so the arithmetic is the same and the text must be equal).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")

from helpers import default_model_path, wait_for_url

KEY = "test-key-123"
MODEL = "smollm2:135m-instruct-q4_1"
CTX = 1024
PROMPTS = [
    "The capital of France is",
    "1, 2, 3, 4,",
    "Once upon a time",
    "The best way to learn Python is",
    "Water boils at",
    "def fibonacci(n):",
    "The largest planet in the solar system is",
    "My favourite colour is",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "LLMQUANT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("LLMQUANT_API_KEY", None)
    log = (home / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmquant", "serve", "--port", "0", "--parallel", "2", "--threads", "1",
         "--ctx", str(CTX), "--api-key", KEY],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env,
    )
    base = wait_for_url(proc, log, timeout=60, what="server")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.seek(0)
    logged = log.read()
    log.close()
    assert "Traceback" not in logged, logged[-3000:]  # no request crashed the server's handlers


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """llama-cpp-python's own greedy generation (independent of llmquant's runtime)."""
    from llama_cpp import Llama

    llm = Llama(str(default_model_path()), n_ctx=CTX, n_threads=1, n_threads_batch=1, verbose=False)
    cache: dict = {}

    def complete(prompt: str, n: int) -> str:
        key = ("c", prompt, n)
        if key not in cache:
            cache[key] = llm.create_completion(prompt, max_tokens=n, temperature=0)["choices"][0]["text"]
        return cache[key]

    def chat(messages: list, n: int) -> str:
        key = ("m", json.dumps(messages), n)
        if key not in cache:
            cache[key] = llm.create_chat_completion(messages, max_tokens=n, temperature=0)["choices"][0]["message"]["content"]
        return cache[key]

    yield complete, chat
    llm.close()


def _raw(server: str, method: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    req = urllib.request.Request(server + path, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _health(server: str) -> dict:
    return _raw(server, "GET", "/health", key=None)[1]


# -- the endpoints ---------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_matches_llama_cpp(client, reference):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference[1](messages, 10)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a fruit."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_streaming_and_not(client, reference):
    prompt = PROMPTS[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == reference[0](prompt, 12)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    pieces = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == r.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


def test_stop_sequences_cut_the_text(client, reference):
    prompt = PROMPTS[0]
    full = reference[0](prompt, 12)
    assert "." in full
    expected = full[: full.index(".")]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=["."])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=["."], stream=True))
    assert "".join(p.choices[0].text for p in streamed) == expected


def test_sampling_with_a_seed_is_repeatable(client):
    args = {"model": MODEL, "prompt": "Tell me a story:", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    a = client.completions.create(**args).choices[0].text
    b = client.completions.create(**args).choices[0].text
    assert a == b and a


def test_embeddings(client):
    r = client.embeddings.create(model=MODEL, input=["hello world", "the cat sat on the mat", "hello world"],
                                 encoding_format="float")
    vecs = [np.array(d.embedding) for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(v.shape == (576,) for v in vecs)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-4 for v in vecs)
    assert np.allclose(vecs[0], vecs[2]) and not np.allclose(vecs[0], vecs[1])
    assert r.usage.prompt_tokens > 0
    b64 = client.embeddings.create(model=MODEL, input="hello world")  # the client's default encoding
    assert np.allclose(np.array(b64.data[0].embedding), vecs[0], atol=1e-6)


def test_api_key_is_required(server, client):
    anonymous = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    status, body = _raw(server, "POST", "/v1/completions", json.dumps({"prompt": "x"}).encode(), key=None)
    assert status == 401 and "API key" in body["error"]["message"]
    assert _health(server)["status"] == "ok"  # health stays open


# -- concurrency and disconnects -------------------------------------------------------------------------
def test_eight_concurrent_clients_get_complete_correct_answers(server, reference):
    expected = [reference[0](p, 8) for p in PROMPTS]

    def ask(i: int) -> tuple[str, int, str | None]:
        c = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
        if i % 2:
            chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=8, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
            text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            return text, chunks[-1].usage.completion_tokens, finish[0] if finish else None
        r = c.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=8, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for i, (text, n, finish) in enumerate(answers):
        assert text == expected[i], f"client {i}: {text!r} != {expected[i]!r}"
        assert finish in ("stop", "length") and (n == 8 or finish == "stop")
    health = _health(server)
    assert health["slots_idle"] == health["slots_total"] == 2


def _start_and_hang_up(server: str, stream: bool) -> None:
    host, port = server.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": MODEL, "prompt": "Write a very long essay about the sea.", "max_tokens": 900,
                       "temperature": 0.7, "stream": stream})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")  # the first token arrived: it is generating
    else:
        time.sleep(0.5)  # generating by now
    conn.sock.close()  # hang up mid-answer
    conn.close()


def test_client_disconnect_mid_answer_frees_the_slot(server, client):
    threads = [threading.Thread(target=_start_and_hang_up, args=(server, stream)) for stream in (True, False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 900 tokens would take far longer than this: the slots come back because generation stopped
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and _health(server)["slots_idle"] != 2:
        time.sleep(0.1)
    assert _health(server)["slots_idle"] == 2
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1


# -- bad requests --------------------------------------------------------------------------------------
BAD = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, "JSON"),
    ("not an object", "/v1/completions", b'[1, 2]', 400, ""),
    ("unknown model", "/v1/chat/completions",
     {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ("negative max_tokens", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("zero max_tokens", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}, 400, "context length"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "non-empty"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty"),
    ("temperature out of range", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 7}, 400, "temperature"),
    ("n > 128", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 129}, 400, "n:"),
    ("token id out of range", "/v1/completions", {"model": MODEL, "prompt": [1, 10**7]}, 400, "token ids"),
    ("empty embedding input", "/v1/embeddings", {"model": MODEL, "input": ""}, 400, "empty"),
    ("too long a prompt", "/v1/completions", {"model": MODEL, "prompt": "hello " * 2000}, 400, "context length"),
]


@pytest.mark.parametrize("what,path,body,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_with_a_message(server, what, path, body, status, needle):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, reply = _raw(server, "POST", path, data)
    assert got == status, reply
    err = reply["error"]
    assert err["message"] and needle.lower() in err["message"].lower(), err
    assert {"type", "param", "code"} <= set(err)


def test_unknown_route_and_server_still_up(server, client):
    status, reply = _raw(server, "GET", "/v1/nothing-here")
    assert status == 404 and reply["error"]["message"]
    assert _health(server)["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0).choices[0].text


# -- the queue itself ------------------------------------------------------------------------------------
def test_waiting_requests_get_slots_in_arrival_order():
    from llmquant.serve.app import Slots

    async def scenario() -> list[int]:
        slots = Slots(["a", "b"])  # stand-ins for loaded models
        held = [await slots.acquire(), await slots.acquire()]
        order: list[int] = []

        async def waiter(i: int) -> None:
            m = await slots.acquire()
            order.append(i)
            await asyncio.sleep(0)
            slots.release(m)

        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(waiter(i)))
            await asyncio.sleep(0)  # arrive one after another
        for m in held:
            slots.release(m)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == list(range(6))


def test_a_busy_port_is_one_clear_line(server):
    port = server.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "llmquant", "serve", "--port", port], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
