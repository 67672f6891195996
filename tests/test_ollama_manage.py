"""Ollama's model-management routes on ``llmquant serve``, through the official ``ollama`` client:
create (from a Modelfile's fields, and with ``quantize``), copy, delete, pull (offline: only what
the store has), push (refused), each seen in the store afterwards (``/api/tags``, ``/api/show``)."""

from __future__ import annotations

import os
import subprocess
import sys

import ollama
import pytest
from helpers import default_model_path
from test_ollama import start_server, stop_server

from llmquant.models import DEFAULT_MODEL_NAME as MODEL


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "LLMQUANT_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "llmquant", "pull", str(default_model_path()), "--name", "base:latest"],
                   env=env, check=True, capture_output=True)
    proc, base, log = start_server(home)
    yield ollama.Client(host=base, timeout=600)
    logged = stop_server(proc, log)
    assert "Traceback" not in logged, logged[-3000:]


def names(client) -> set[str]:
    return {m.model for m in client.list().models}


def test_create_from_fields_then_show(client):
    r = client.create(model="pirate:latest", from_="base:latest", system="You are a pirate.",
                      parameters={"temperature": 0.25, "stop": ["<|im_end|>", "ARR"]})
    assert r.status == "success"
    assert "pirate:latest" in names(client)
    s = client.show("pirate:latest")
    assert 'SYSTEM "You are a pirate."' in s.modelfile or "SYSTEM You are a pirate." in s.modelfile
    assert "temperature" in s.parameters and "ARR" in s.parameters
    streamed = list(client.create(model="pirate2", from_="pirate:latest", stream=True))
    assert streamed[0].status and streamed[-1].status == "success"
    assert "You are a pirate." in client.show("pirate2:latest").modelfile  # FROM a stored model inherits


def test_create_quantize_writes_the_type(client):
    r = client.create(model="base:q8", from_=MODEL, quantize="q8_0")  # the embedded Q4_1 model: from its F32
    assert r.status == "success"
    m = next(m for m in client.list().models if m.model == "base:q8")
    assert m.details.quantization_level == "Q8_0"
    out = client.generate(model="base:q8", prompt="The capital of France is", options={"num_predict": 4, "temperature": 0})
    assert out.eval_count > 0


def test_create_quantize_refuses_a_quantized_source(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.create(model="base:q5", from_="base:latest", quantize="q5_0")  # a Q4_1 file, not the embedded one
    assert e.value.status_code == 400 and "requantiz" in str(e.value)
    assert "base:q5" not in names(client)


def test_copy_delete(client):
    assert client.copy("base:latest", "copy:one").status == "success"
    assert {"base:latest", "copy:one"} <= names(client)
    assert client.show("copy:one").modelinfo["llama.block_count"] == 30
    assert client.delete("copy:one").status == "success"
    assert "copy:one" not in names(client) and "base:latest" in names(client)
    for call in (lambda: client.delete("copy:one"), lambda: client.copy("nope:1", "x:1")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(MODEL)
    assert e.value.status_code == 400 and "embedded" in str(e.value)


def test_pull_is_offline_and_push_is_refused(client):
    assert client.pull("base:latest").status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3.2:1b")
    assert e.value.status_code == 404 and "llmquant pull FILE" in str(e.value)
    with pytest.raises(ollama.ResponseError) as e:
        client.push("base:latest")
    assert e.value.status_code == 400 and "no registry" in str(e.value)


def test_create_refuses_bad_requests(client):
    for kwargs, status, needle in (({"model": "x:1"}, 400, "from"),
                                   ({"model": "x:1", "from_": "missing:model"}, 400, "missing:model"),
                                   ({"model": "bad name!", "from_": "base:latest"}, 400, "name"),
                                   ({"model": "x:1", "files": {"a.gguf": "sha256:00"}}, 400, "files")):
        with pytest.raises(ollama.ResponseError) as e:
            client.create(**kwargs)
        assert e.value.status_code == status and needle in str(e.value), (kwargs, str(e.value))
    assert "x:1" not in names(client)
