"""``llmquant serve`` as a real subprocess, driven by the official ``ollama`` Python client.

Greedy answers are compared with llama-cpp-python's own greedy generation in this process (same
model, one thread on both sides). Two more names for the default model are pulled into a private
store, so the server has three models to load by name with room for two (LRU unloading).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ollama = pytest.importorskip("ollama")
jsonschema = pytest.importorskip("jsonschema")

from helpers import default_model_path, wait_for_url

KEY = "ollama-test-key"
MODEL = "smollm2:135m-instruct-q4_1"
CTX = 1024
pytestmark = pytest.mark.slow


def start_server(home, *args: str) -> tuple[subprocess.Popen, str, object]:
    env = {**os.environ, "LLMQUANT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("LLMQUANT_API_KEY", None)
    log = (home / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "llmquant", "serve", "--port", "0", "--threads", "1",
                             "--ctx", str(CTX), *args], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    return proc, wait_for_url(proc, log, timeout=90, what="server"), log


def stop_server(proc, log) -> str:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.seek(0)
    text = log.read()
    log.close()
    return text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "LLMQUANT_HOME": str(home)}
    for name in ("second:latest", "third:q4"):
        subprocess.run([sys.executable, "-m", "llmquant", "pull", str(default_model_path()), "--name", name],
                       env=env, check=True, capture_output=True)
    proc, base, log = start_server(home, "--api-key", KEY, "--parallel", "2", "--max-models", "2")
    yield base
    logged = stop_server(proc, log)
    assert "Traceback" not in logged, logged[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)


@pytest.fixture(scope="module")
def reference():
    from llama_cpp import Llama

    llm = Llama(str(default_model_path()), n_ctx=CTX, n_threads=1, n_threads_batch=1, verbose=False)

    def chat(messages: list, n: int) -> str:
        return llm.create_chat_completion(messages, max_tokens=n, temperature=0)["choices"][0]["message"]["content"]

    yield chat
    llm.close()


GREEDY = {"temperature": 0, "num_predict": 12}


def test_chat_matches_llama_cpp(client, reference):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat(model=MODEL, messages=messages, options=GREEDY)
    assert r.message.role == "assistant"
    assert r.message.content == reference(messages, 12)
    assert r.done and r.done_reason in ("stop", "length")
    assert r.eval_count <= 12 and r.prompt_eval_count > 10
    assert r.total_duration >= r.eval_duration > 0  # nanoseconds


def test_chat_streaming_equals_non_streaming(client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a fruit."}]
    whole = client.chat(model=MODEL, messages=messages, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=messages, options=GREEDY, stream=True))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_streaming_and_not(client, reference):
    r = client.generate(model=MODEL, prompt="What is the capital of France?", options=GREEDY)
    assert r.response == reference([{"role": "user", "content": "What is the capital of France?"}], 12)
    parts = list(client.generate(model=MODEL, prompt="What is the capital of France?", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == r.response
    assert parts[-1].done and parts[-1].context == r.context and len(r.context) > r.prompt_eval_count
    raw = client.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True, options={"temperature": 0, "num_predict": 6,
                                                                              "stop": ["7"]})
    assert raw.response.startswith(" 5") and "7" not in raw.response


def test_seed_repeats_and_options_apply(client):
    opts = {"temperature": 1.0, "seed": 42, "num_predict": 10, "top_k": 50}
    a = client.generate(model=MODEL, prompt="Tell me a story.", options=opts)
    b = client.generate(model=MODEL, prompt="Tell me a story.", options=opts)
    assert a.response == b.response
    assert client.generate(model=MODEL, prompt="Tell me a story.", options={"num_predict": 3}).eval_count <= 3


def test_list_and_show(client):
    names = [m.model for m in client.list().models]
    assert names[-1] == MODEL and {"second:latest", "third:q4"} <= set(names)
    m = next(m for m in client.list().models if m.model == MODEL)
    assert m.details.format == "gguf" and m.details.family == "llama"
    assert m.details.quantization_level == "Q4_1" and m.details.parameter_size == "134.52M"
    assert m.size == default_model_path().stat().st_size
    s = client.show(MODEL)
    assert s.modelinfo["general.architecture"] == "llama" and s.modelinfo["llama.block_count"] == 30
    assert "completion" in s.capabilities
    assert s.modelfile.splitlines()[4].startswith("FROM ") and 'stop' in s.parameters


def test_embed_matches_openai_route(client, server):
    e = client.embed(model=MODEL, input=["hello world", "a cat"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 576
    req = urllib.request.Request(f"{server}/v1/embeddings", data=json.dumps({"model": MODEL, "input": "hello world"}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        v = json.loads(resp.read())["data"][0]["embedding"]
    assert max(abs(a - b) for a, b in zip(v, e.embeddings[0])) < 1e-6
    short = client.embed(model=MODEL, input="hello world", dimensions=64)
    assert len(short.embeddings[0]) == 64 and abs(sum(x * x for x in short.embeddings[0]) - 1) < 1e-4


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": False}


def test_format_schema_and_json(client):
    for seed in range(3):
        r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}],
                        format=SCHEMA, options={"temperature": 1.0, "seed": seed, "num_predict": 80})
        jsonschema.validate(json.loads(r.message.content), SCHEMA)
    r = client.generate(model=MODEL, prompt="A JSON object about the moon:", format="json",
                        options={"temperature": 0.7, "seed": 1, "num_predict": 60})
    assert r.response.startswith("{")  # any JSON object (llama.cpp's json.gbnf): complete only if it stopped
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.response), dict)


def test_unknown_model_and_bad_key(server, client):
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 404 and "not found" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        client.show("no-such-model")
    assert exc.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as exc:
        ollama.Client(host=server).list()
    assert exc.value.status_code == 401
    req = urllib.request.Request(f"{server}/api/generate", data=json.dumps(
        {"model": MODEL, "prompt": "hi", "format": "yaml"}).encode(), headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=30)
    assert http.value.code == 400 and "format" in json.loads(http.value.read())["error"]


def test_concurrent_clients_get_their_own_answers(client, server):
    prompts = ["Name a colour.", "Name a planet.", "Name a river.", "Name an animal."]
    alone = {p: client.generate(model=MODEL, prompt=p, options=GREEDY).response for p in prompts}

    async def together():
        ac = ollama.AsyncClient(host=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)

        async def one(p: str, stream: bool) -> str:
            if stream:
                return "".join([part.response async for part in await ac.generate(
                    model=MODEL, prompt=p, options=GREEDY, stream=True)])
            return (await ac.generate(model=MODEL, prompt=p, options=GREEDY)).response

        return await asyncio.gather(*(one(p, i % 2 == 0) for i, p in enumerate(prompts * 2)))

    got = asyncio.run(together())
    assert got == [alone[p] for p in prompts * 2]


def test_models_load_by_name_and_the_least_recently_used_unloads(client):
    """--max-models 2: the default, then 'second', then the default again, then 'third' — 'second' goes."""
    client.generate(model=MODEL, prompt="hi", options={"num_predict": 1})
    client.generate(model="second", prompt="hi", options={"num_predict": 1})
    assert {m.model for m in client.ps().models} == {MODEL, "second:latest"}
    client.generate(model=MODEL, prompt="hi", options={"num_predict": 1})
    r = client.generate(model="third:q4", prompt="hi", options={"num_predict": 1})
    assert r.load_duration > 0
    assert [m.model for m in client.ps().models] == ["third:q4", MODEL]
    # keep_alive 0 with an empty prompt unloads (Ollama's convention)
    done = client.generate(model="third:q4", keep_alive=0)
    assert done.done_reason == "unload" and [m.model for m in client.ps().models] == [MODEL]
    # a load-only request loads and reports a keep-alive deadline
    assert client.generate(model="second", keep_alive="10m").done_reason == "load"
    ps = {m.model: m for m in client.ps().models}
    assert ps["second:latest"].context_length == CTX and ps["second:latest"].size > 0
    left = ps["second:latest"].expires_at.timestamp() - time.time()
    assert 500 < left <= 600


def test_version(server):
    with urllib.request.urlopen(f"{server}/api/version", timeout=10) as resp:
        v = json.loads(resp.read())
    assert v["version"].count(".") == 2 and v["llmquant"]


# -- the pool alone (no models: its loader and costs are the test's) -------------------------------------
def test_pool_respects_the_memory_budget_and_waits_for_busy_models():
    from llmquant.serve.app import APIError, ServerState, Slots
    from llmquant.serve.pool import ModelPool

    class Stub:
        def close(self):
            closed.append(self)

    closed: list = []

    def loader(path, model_id, **kw):
        return ServerState(model_id, path, Slots([Stub()]), Stub(), kw["n_ctx"], 1, aliases={model_id})

    sizes = {"a": 100, "b": 100, "c": 150, "huge": 1000}
    pool = ModelPool(budget=260, max_models=8, resolve=lambda n: (n, n), cost=lambda p, c, par: sizes[p],
                     loader=loader)

    async def scenario():
        a = await pool.acquire("a")
        b = await pool.acquire("b")
        pool.release(a)
        pool.release(b)
        c = await pool.acquire("c")  # 100 + 100 + 150 > 260: 'a' (least recently used) goes
        assert [e.key[0] for e in pool.loaded()] == ["c", "b"]
        waiter = asyncio.ensure_future(pool.acquire("a"))  # needs 'b' or 'c' gone; 'c' is busy
        await asyncio.sleep(0.1)
        assert [e.key[0] for e in pool.loaded()] == ["a", "c"]  # 'b' was idle: unloaded
        pool.release(await waiter)
        b2 = asyncio.ensure_future(pool.acquire("b"))  # needs room: 'a' is idle, goes
        pool.release(await b2)
        assert {e.key[0] for e in pool.loaded()} == {"b", "c"}
        with pytest.raises(APIError, match="more system memory"):
            await pool.acquire("huge")
        pool.release(c)

    asyncio.run(scenario())
    assert pool.used <= 260 and len(closed) >= 4
