"""OpenAI's structured output, log-probabilities, n > 1 and tool calls on a real ``llmquant serve``,
driven by the official ``openai`` client.

Tools need a chat template that renders them: the default model is copied with Qwen2.5-Instruct's
tool-calling template (Hermes ``<tool_call>`` format, from its tokenizer_config.json) by gguf-py's
own ``gguf_new_metadata`` copier and pulled into the server's store as ``tools:test``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from helpers import default_model_path
from test_ollama import start_server, stop_server

MODEL = "smollm2:135m-instruct-q4_1"
TOOLS_MODEL = "tools:test"
CTX = 1024
pytestmark = pytest.mark.slow

QWEN25_TOOLS_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def with_chat_template(src, dst, template: str):
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(src), "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(
        gguf.GGUFValueType.STRING, template)}, [])
    return dst


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    tools_gguf = with_chat_template(default_model_path(), tmp_path_factory.mktemp("m") / "tools.gguf",
                                    QWEN25_TOOLS_TEMPLATE)
    subprocess.run([sys.executable, "-m", "llmquant", "pull", str(tools_gguf), "--name", TOOLS_MODEL],
                   env={**os.environ, "LLMQUANT_HOME": str(home)}, check=True, capture_output=True)
    proc, base, log = start_server(home)
    yield base
    logged = stop_server(proc, log)
    assert "Traceback" not in logged, logged[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=600)


# -- structured output ---------------------------------------------------------------------------------
VERDICT = {"type": "object", "properties": {
    "answer": {"enum": ["yes", "no", "maybe"]},
    "score": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["answer", "score"], "additionalProperties": False}


def test_json_schema_fifty_samples_at_temperature_one_all_valid(client):
    r = client.chat.completions.create(
        model=MODEL, n=50, temperature=1.0, seed=7, max_tokens=40,
        messages=[{"role": "user", "content": "Is the sea salty? Answer as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}})
    assert len(r.choices) == 50 and [c.index for c in r.choices] == list(range(50))
    docs = []
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        doc = json.loads(c.message.content)
        jsonschema.validate(doc, VERDICT)
        docs.append(json.dumps(doc, sort_keys=True))
    assert len(set(docs)) > 5  # sampled, not one answer repeated
    assert r.usage.completion_tokens >= 50 * 8


def test_json_object_mode(client):
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=200, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_bad_schema_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {"schema": 5}})


# -- log-probabilities --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_llm():
    from llama_cpp import Llama

    llm = Llama(str(default_model_path()), n_ctx=CTX, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False)
    yield llm
    llm.close()


def test_chat_logprobs_equal_the_runtimes_own(client, reference_llm):
    """llama-cpp-python's own create_chat_completion(logprobs=True) decodes the same way (prompt
    batch, then one token at a time, one thread): the numbers must agree to float rounding."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    got = r.choices[0].logprobs.content
    assert len(got) == r.usage.completion_tokens == 6
    assert "".join(e.token for e in got) == r.choices[0].message.content
    reference_llm.reset()
    want = reference_llm.create_chat_completion(messages, max_tokens=6, temperature=0, logprobs=True,
                                                top_logprobs=3)["choices"][0]["logprobs"]["content"]
    assert [e.token for e in got] == [w["token"] for w in want]
    for e, w in zip(got, want):
        assert abs(e.logprob - w["logprob"]) < 1e-4, (e.token, e.logprob, w["logprob"])
        assert e.logprob == max(t.logprob for t in e.top_logprobs)  # greedy: the chosen token is the best
        assert [t.token for t in e.top_logprobs] == [t["token"] for t in w["top_logprobs"]]
        assert np.allclose([t.logprob for t in e.top_logprobs], [t["logprob"] for t in w["top_logprobs"]], atol=1e-4)


def test_completion_logprobs_and_n(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logprobs=2, n=2)
    a, b = r.choices
    assert a.text == b.text and a.logprobs.tokens == b.logprobs.tokens  # greedy: both choices equal
    assert "".join(a.logprobs.tokens) == a.text and len(a.logprobs.top_logprobs[0]) == 2
    assert a.logprobs.text_offset[0] == 0 and all(v <= 0 for v in a.logprobs.token_logprobs)
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                            temperature=0, logprobs=1, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == a.logprobs.tokens


# -- tools -----------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                          "parameters": {"type": "object", "properties": {}}}}


def test_tool_call_round_trip(client, server):
    from llmquant.runtime.chat import render_chat

    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=TOOLS_MODEL, messages=messages, tools=[WEATHER, CLOCK],
                                       tool_choice="required", temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name in ("get_weather", "get_time") and call.id
    args = json.loads(call.function.arguments)
    schema = (WEATHER if call.function.name == "get_weather" else CLOCK)["function"]["parameters"]
    jsonschema.validate(args, schema)
    # the tool's result goes back; the model answers in text, from a prompt its own template rendered
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    answer = client.chat.completions.create(model=TOOLS_MODEL, messages=history, tools=[WEATHER, CLOCK],
                                            tool_choice="none", temperature=0, max_tokens=20)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    rendered = render_chat(QWEN25_TOOLS_TEMPLATE, [
        messages[0], {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": call.function.name, "arguments": args}}]},
        {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'}], tools=[WEATHER, CLOCK])
    assert "<tool_response>" in rendered and '"get_weather"' in rendered
    from llama_cpp import Llama

    vocab = Llama(str(default_model_path()), vocab_only=True, verbose=False)
    n_prompt = len(vocab.tokenize(rendered.encode(), add_bos=True, special=True))
    assert answer.usage.prompt_tokens == n_prompt  # the server rendered exactly this prompt


def test_named_tool_call_streams(client):
    chunks = list(client.chat.completions.create(
        model=TOOLS_MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0.8, seed=3,
        max_tokens=60, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_template_without_tools_refuses_them(client):
    with pytest.raises(openai.BadRequestError, match="does not render tools"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER])


def test_parse_tool_calls_formats():
    from llmquant.serve.engine import parse_tool_calls

    tools = [WEATHER, CLOCK]
    text, calls = parse_tool_calls('Sure.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', tools)
    assert text == "Sure." and calls[0]["function"] == {"name": "get_time", "arguments": "{}"}
    _, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}', tools)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome", "unit": "celsius"}
    assert parse_tool_calls('{"name": "launch_rockets", "arguments": {}}', tools)[1] == []
    assert parse_tool_calls("It is sunny.", tools) == ("It is sunny.", [])
