"""Modelfiles in Ollama's syntax: ``llmquant create NAME -f Modelfile`` then ``show --modelfile``
gives back the same parameters, system prompt and template, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import default_model_path

# Ollama's ChatML template as its library models carry it (Go-template form)
TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
"""

MODELFILE = '''# a comment
FROM @SRC@
TEMPLATE """''' + TEMPLATE + '''"""
SYSTEM """You are a pirate.
Answer in one "short" line."""
parameter temperature 0.3
PARAMETER num_ctx 2048
PARAMETER stop <|im_end|>
PARAMETER stop "User:"
PARAMETER seed 7
MESSAGE user Hello
MESSAGE assistant "Ahoy!"
'''


def cli(home, *args, check=True):
    env = {**os.environ, "LLMQUANT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "llmquant", *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.mark.slow
def test_create_then_show_round_trip(tmp_path):
    home = tmp_path / "home"
    (tmp_path / "Modelfile").write_text(MODELFILE.replace("@SRC@", str(default_model_path())))
    cli(home, "create", "pirate:v1", "-f", str(tmp_path / "Modelfile"))
    shown = cli(home, "show", "pirate:v1", "--modelfile").stdout
    # the printed Modelfile is itself a valid one: create from it, and the settings stay the same
    (tmp_path / "Modelfile2").write_text(shown)
    cli(home, "create", "pirate:v2", "-f", str(tmp_path / "Modelfile2"))
    from llmquant.serve.modelfile import parse_modelfile

    first, second = parse_modelfile(MODELFILE.replace("@SRC@", str(default_model_path()))), parse_modelfile(shown)
    again = parse_modelfile(cli(home, "show", "pirate:v2", "--modelfile").stdout)
    for mf in (second, again):
        assert mf.parameters == {"temperature": 0.3, "num_ctx": 2048, "stop": ["<|im_end|>", "User:"], "seed": 7}
        assert mf.system == 'You are a pirate.\nAnswer in one "short" line.' == first.system
        assert mf.template == TEMPLATE == first.template
        assert mf.messages == first.messages == [{"role": "user", "content": "Hello"},
                                                 {"role": "assistant", "content": "Ahoy!"}]
        assert os.path.getsize(mf.source) == default_model_path().stat().st_size  # the stored (linked) file
    # FROM a stored name inherits, and the store lists it with the same file
    (tmp_path / "Modelfile3").write_text("FROM pirate:v1\nPARAMETER temperature 0.9\n")
    cli(home, "create", "pirate:v3", "-f", str(tmp_path / "Modelfile3"))
    v3 = parse_modelfile(cli(home, "show", "pirate:v3", "--modelfile").stdout)
    assert v3.parameters["temperature"] == 0.9 and v3.parameters["seed"] == 7 and v3.system == first.system
    listed = {m["name"]: m for m in json.loads(cli(home, "list", "--json").stdout)}
    assert listed["pirate:v3:latest" if "pirate:v3:latest" in listed else "pirate:v3"]["size"] == \
        default_model_path().stat().st_size


@pytest.mark.parametrize("text,needle", [
    ("PARAMETER temperature 0.3\n", "no FROM"),
    ("FROM x.gguf\nPARAMETER temprature 0.3\n", "unknown PARAMETER 'temprature'"),
    ("FROM x.gguf\nPARAMETER num_ctx lots\n", "must be an integer"),
    ("FROM x.gguf\nSYSTEM \"\"\"never closed\n", "unterminated"),
    ("FROM x.gguf\nBOGUS thing\n", "unknown instruction 'BOGUS'"),
    ("FROM x.gguf\nMESSAGE wizard hi\n", "MESSAGE role"),
])
def test_bad_modelfiles_are_one_line_errors(text, needle):
    from llmquant.serve.modelfile import ModelfileError, parse_modelfile

    with pytest.raises(ModelfileError, match=needle.replace("(", r"\(")):
        parse_modelfile(text, name="Modelfile")


def test_create_from_a_missing_file_is_one_clear_line(tmp_path):
    (tmp_path / "Modelfile").write_text("FROM ./nothing-here.gguf\n")
    r = cli(tmp_path / "home", "create", "x", "-f", str(tmp_path / "Modelfile"), check=False)
    assert r.returncode == 1 and "no such file or stored model" in r.stderr and "Traceback" not in r.stderr
