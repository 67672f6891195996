"""``run``, ``chat`` and ``bench``: greedy output equal to llama-cpp-python's own, chat templates
rendered in a sandbox that refuses to reach Python internals, the REPL, and the bench columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import default_model_path

PROMPT = "The three primary colours are"


def llmquant(*args: str, stdin: str | None = None, home: Path | None = None, timeout: int = 120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if home is not None:
        env["LLMQUANT_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "llmquant", *args], input=stdin, capture_output=True, check=False,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def llama():
    from llama_cpp import Llama

    llm = Llama(str(default_model_path()), n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False)
    yield llm
    llm.close()


# -- run ----------------------------------------------------------------------------------------------
def test_run_greedy_equals_llama_cpp_python(llama, tmp_path):
    expected = llama.create_completion(PROMPT, max_tokens=24, temperature=0)["choices"][0]["text"]
    r = llmquant("run", "-p", PROMPT, "-n", "24", "--temp", "0", "-t", "1", "--ctx", "1024", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["text"] == expected
    assert data["completion_tokens"] == len(data["tokens"]) <= 24
    assert data["generation_tps"] > 0
    # the plain form streams the same text to stdout and the speed to stderr
    plain = llmquant("run", "-p", PROMPT, "-n", "24", "--temp", "0", "-t", "1", "--ctx", "1024", home=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == expected + "\n"
    assert "tok/s" in plain.stderr


def test_run_chat_equals_llama_cpp_python_chat(llama, tmp_path):
    messages = [{"role": "user", "content": "What colour is the sky?"}]
    expected = llama.create_chat_completion(messages, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    r = llmquant("run", "--chat", "-p", messages[0]["content"], "-n", "16", "--temp", "0", "-t", "1", "--ctx", "1024",
                 "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == expected


def test_run_reads_the_prompt_from_stdin(llama, tmp_path):
    expected = llama.create_completion(PROMPT, max_tokens=6, temperature=0)["choices"][0]["text"]
    r = llmquant("run", "-n", "6", "--temp", "0", "-t", "1", "--ctx", "1024", "--json", stdin=PROMPT, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == expected


def test_run_unknown_model_is_one_line(tmp_path):
    r = llmquant("run", "no-such-model:7b", "-p", "hi", home=tmp_path)
    assert r.returncode == 1
    assert "no-such-model:7b" in r.stderr and "Traceback" not in r.stderr


def test_stream_pieces_hold_back_partial_stop_strings():
    from llmquant.runtime.llama import Model, Sampling

    with Model(default_model_path(), n_ctx=256, threads=1) as m:
        whole = m.generate(PROMPT, max_tokens=16, sampling=Sampling(temperature=0)).consume()
        cut_at = whole.text[5:9]  # a stop string from the middle of the answer
        stream = m.generate(PROMPT, max_tokens=16, sampling=Sampling(temperature=0), stop=[cut_at, "zzzz"])
        pieces = list(stream)
    assert "".join(pieces) == stream.text == whole.text[: whole.text.index(cut_at)]
    assert stream.stats.finish_reason == "stop"


def test_held_back_suffixes():
    from llmquant.runtime.llama import _held_back

    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["world"]) == 0
    assert _held_back("ab<|im", ["<|im_end|>", "b<"]) == 4
    assert _held_back("x", []) == 0


# -- the chat template sandbox -------------------------------------------------------------------------
HOSTILE = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",  # plain Jinja2 sandboxes render this as '' — ours refuses it
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{% for m in messages %}{{ m.__class__.__init__.__globals__['__builtins__'] }}{% endfor %}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{{ ''.join.__self__.__class__ }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_sandbox_refuses_python_internals(template):
    from llmquant.runtime.chat import ChatTemplateError, render_chat

    with pytest.raises(ChatTemplateError, match="refused by the sandbox"):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_sandbox_renders_ordinary_templates():
    from llmquant.runtime.chat import ChatTemplateError, render_chat

    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}[S]{{ m.content | trim }}"
        "{% else %}[{{ m['role'] | upper }}]{{ m.content | tojson }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[A]{% endif %}"
    )
    msgs = [{"role": "system", "content": " be brief "}, {"role": "user", "content": "héllo"}]
    assert render_chat(template, msgs, bos_token="<s>") == '<s>[S]be brief[USER]"héllo"[A]'
    hf_style = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% if loop.first %}{% break %}{% endif %}{% endfor %}"
    assert render_chat(hf_style, msgs) == " be brief "
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", msgs)
    with pytest.raises(ChatTemplateError, match="cannot parse"):
        render_chat("{% for %}", msgs)


def _with_template(src: Path, dst: Path, template: str) -> Path:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.get_field("general.architecture").contents())
    copy_with_new_metadata(reader, writer, {
        gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}, [])
    return dst


def test_chat_refuses_a_gguf_whose_template_reaches_for_python(tmp_path):
    evil = _with_template(default_model_path(), tmp_path / "evil.gguf",
                          "{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}")
    r = llmquant("chat", str(evil), "-n", "4", "-t", "1", stdin="hello\n/bye\n", home=tmp_path)
    assert r.returncode == 1
    assert "refused by the sandbox" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.strip() == ""
    r = llmquant("run", str(evil), "--chat", "-p", "hello", "-n", "4", "-t", "1", home=tmp_path)
    assert r.returncode == 1 and "refused by the sandbox" in r.stderr


# -- chat --------------------------------------------------------------------------------------------
def test_chat_repl_answers_keeps_history_and_says_bye(tmp_path):
    script = "What is 2+2?\n/history\n/clear\n/history\n/nonsense\nAnd 3+3?\n/bye\nnever read\n"
    r = llmquant("chat", "-n", "12", "--temp", "0", "-t", "1", "--ctx", "1024", stdin=script, home=tmp_path)
    assert r.returncode == 0, r.stderr
    answers = [a for a in r.stdout.split("\n\n") if a.strip()]
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert "user: What is 2+2?" in r.stderr and "assistant: " in r.stderr
    assert "conversation cleared" in r.stderr and "unknown command /nonsense" in r.stderr


def test_chat_session_reuses_the_cache_and_drops_old_turns():
    from llmquant.serve.session import ChatSession
    from llmquant.runtime.llama import Model, Sampling

    with Model(default_model_path(), n_ctx=160, threads=1) as m:
        s = ChatSession(m, Sampling(temperature=0), max_tokens=8, system="Be brief.", reserve=40)
        for q in ["Name a colour.", "Name an animal.", "Name a country.", "Name a fruit.", "Name a city.",
                  "Name a river.", "Name a tree.", "Name a planet."]:
            stream = s.send(q)
            text = "".join(stream)
            s.commit(q, text)
            assert stream.stats.completion_tokens >= 1
        assert s.dropped > 0  # 160 tokens cannot hold eight turns
        assert s.messages()[0] == {"role": "system", "content": "Be brief."}
        # a fresh session with the same (trimmed) history answers the same: the reused cache is right
        again = ChatSession(m, Sampling(temperature=0), max_tokens=8, system="Be brief.", reserve=40,
                            history=list(s.history[:-2]))
        m.eval_tokens([0], reset=True)  # a cold cache
        assert "".join(again.send(s.history[-2]["content"])) == s.history[-1]["content"]


# -- bench -------------------------------------------------------------------------------------------
def test_bench_prints_llama_bench_columns(tmp_path):
    r = llmquant("bench", "-p", "32", "-n", "4", "-r", "2", "-t", "1", home=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "size", "params", "backend", "threads", "test", "t/s"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[5] for row in rows] == ["pp32", "tg4"]
    assert rows[0][0] == "llama 135M Q4_1" and rows[0][4] == "1" and "±" in rows[0][6]
    j = llmquant("bench", "-p", "16", "-n", "2", "-r", "1", "-t", "1", "--json", home=tmp_path)
    data = json.loads(j.stdout)
    assert data["pp_tps"] > 0 and data["tg_tps"] > 0 and [r["test"] for r in data["rows"]] == ["pp16", "tg2"]
