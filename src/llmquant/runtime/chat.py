"""Chat templates: a GGUF's ``tokenizer.chat_template`` rendered in a sandboxed Jinja2 environment.

A chat template is code that arrives with a downloaded model, so it is rendered the way
Hugging Face transformers renders it (``ImmutableSandboxedEnvironment``, ``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, a ``tojson`` that
keeps non-ASCII) — with one difference: where Jinja2's sandbox quietly turns an unsafe attribute
(``''.__class__``) into an empty Undefined, this one refuses the template with
``ChatTemplateError``. A model without a template gets ChatML, as llama.cpp does.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..errors import LlmquantError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatTemplateError(LlmquantError):
    """A chat template that fails to render, or that the sandbox refuses."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(f"chat template: {problem}")


def _sandbox():
    from jinja2 import BaseLoader, ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        """Refuse unsafe attribute access outright instead of rendering it as ''."""

        def unsafe_undefined(self, obj: Any, attribute: str):
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    class GenerationTag(ext.Extension):
        """Hugging Face's ``{% generation %}...{% endgeneration %}`` (marks training targets): pass-through."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = StrictSandbox(loader=BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                        extensions=[ext.loopcontrols, GenerationTag], autoescape=False)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise ChatTemplateError(f"the template refused the conversation: {message}")


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError

    try:
        return _sandbox().from_string(template)
    except TemplateError as exc:
        raise ChatTemplateError(f"cannot parse it: {exc}") from None


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}]``)."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    compiled = _compile(template or CHATML_TEMPLATE)
    try:
        return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt, **extra)
    except SecurityError as exc:
        raise ChatTemplateError(f"refused by the sandbox: {exc}") from None
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise ChatTemplateError(f"cannot render it: {type(exc).__name__}: {exc}") from None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages in OpenAI's (or Ollama's) shape -> ``[{"role", "content"}]`` with text content (text
    parts are joined, ``developer`` becomes ``system``), keeping an assistant's ``tool_calls`` (their
    ``arguments`` as objects, the way Hugging Face templates read them) and a tool result's
    ``tool_call_id`` / ``name``. Raises ``ValueError`` naming the bad message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")  # noqa: TRY004
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: only text is supported
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}]: only parts of type 'text' are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], i)
        for key in ("tool_call_id", "name", "tool_name"):
            if isinstance(m.get(key), str):
                msg["name" if key == "tool_name" else key] = m[key]
        out.append(msg)
    return out


def _tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise ValueError(f"messages[{i}].tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"messages[{i}].tool_calls[{j}] must have a function with a name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON") from None
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out
