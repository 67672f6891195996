"""Chat templates: a GGUF's ``tokenizer.chat_template`` rendered in a sandboxed Jinja2 environment.

A chat template is code that arrives with a downloaded model, so it is rendered the way
Hugging Face transformers renders it (``ImmutableSandboxedEnvironment``, ``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, a ``tojson`` that
keeps non-ASCII) — with one difference: where Jinja2's sandbox quietly turns an unsafe attribute
(``''.__class__``) into an empty Undefined, this one refuses the template with
``ChatTemplateError``. A model without a template gets ChatML, as llama.cpp does.
"""

from __future__ import annotations

import functools
import json
import re
import time
from contextvars import ContextVar
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


# A template is code from a stranger: besides the sandbox's attribute rules, a render gets a budget
# (Jinja2's sandbox bounds only range()). Every loop iteration, call and produced value is charged:
# one unit per iteration or call, one per character (or item) of each string or list a call, filter
# or operator returns, plus the template text each loop iteration emits; operators and calls that could
# make one huge value (``'a' * 10**9``, ``10**10**9``, ``x|center(10**9)``) are checked before they run.
RENDER_SECONDS = 2.0
RENDER_FUEL = 32_000_000
MAX_INT_BITS = 1 << 16
_WIDTH = re.compile(r"\d{6,}")  # a width or precision of a million or more in a format string


class _Budget:
    __slots__ = ("fuel", "deadline")

    def __init__(self) -> None:
        self.fuel = RENDER_FUEL
        self.deadline = time.monotonic() + RENDER_SECONDS

    def charge(self, units: int) -> None:
        self.fuel -= units
        if self.fuel < 0:
            raise ChatTemplateError(f"refused: rendering needs more than {RENDER_FUEL:,} steps or characters")
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"refused: rendering took more than {RENDER_SECONDS:g} s")


_budget: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


def _charge(units: int) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.charge(units)


def _size(x: Any) -> int:
    if isinstance(x, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(x)
    if isinstance(x, int):
        return x.bit_length() // 64
    return 0


# calls whose result can be (their inputs) x (an integer argument) large, or (text) x (replacement) large
_GROWING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap", "slice", "batch",
                      "tojson", "format", "format_map", "do_format"})


def _guard_args(name: str, obj: Any, args: tuple, kwargs: dict) -> None:
    """Refuse, before it runs, a call that could build one value larger than the whole budget."""
    values = (*args, *kwargs.values())
    if name in ("format", "format_map", "do_format"):
        fmt = obj if isinstance(obj, str) else next((a for a in args if isinstance(a, str)), "")
        if _WIDTH.search(fmt):
            raise ChatTemplateError("refused: a format width or precision of a million or more")
    if name in _GROWING:
        ints = [abs(a) for a in values if isinstance(a, int) and not isinstance(a, bool)]
        inputs = 1 + _size(obj) + sum(_size(a) for a in values)
        if inputs * max(ints, default=1) > RENDER_FUEL:
            raise ChatTemplateError(f"refused: {name}() with these arguments could build more than "
                                    f"{RENDER_FUEL:,} characters")
    elif name == "replace":
        texts = [_size(a) for a in (obj, *values) if isinstance(a, str)]
        if len(texts) >= 3 and texts[0] * (texts[2] + 1) > RENDER_FUEL:
            raise ChatTemplateError(f"refused: replace() could build more than {RENDER_FUEL:,} characters")


def _guard_binop(op: str, left: Any, right: Any) -> None:
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if max(left.bit_length(), 1) * right > MAX_INT_BITS:
            raise ChatTemplateError(f"refused: {left} ** {right} is too large")
    elif op == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise ChatTemplateError("refused: a product of too large integers")
        else:
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and _size(seq) * n > RENDER_FUEL:
                raise ChatTemplateError(f"refused: repeating a value {n} times builds more than {RENDER_FUEL:,} items")
    elif op == "%" and isinstance(left, str):
        if _WIDTH.search(left) or ("*" in left and any(
                isinstance(a, int) and abs(a) >= 10**6 for a in (right if isinstance(right, tuple) else (right,)))):
            raise ChatTemplateError("refused: a %-format width of a million or more")


def _guard_filter(name: str, fn):
    @functools.wraps(fn)  # (keeps jinja's pass_context / pass_environment marks)
    def guarded(*args, **kwargs):
        _guard_args(name, None, args, kwargs)
        result = fn(*args, **kwargs)
        _charge(1 + _size(result))
        return result

    return guarded


def _loop(iterable: Any, text_per_item: int = 0):
    """Every ``{% for %}`` iterates through this (see StrictSandbox._parse)."""
    cost = 1 + text_per_item
    for item in iterable:
        _charge(cost)
        yield item


def _sized(value: Any) -> Any:
    _charge(1 + _size(value))
    return value


def _sandbox():
    from jinja2 import BaseLoader, ext, nodes
    from jinja2.visitor import NodeTransformer
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        """Refuse unsafe attribute access outright instead of rendering it as ''; charge the budget."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def unsafe_undefined(self, obj: Any, attribute: str):
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

        def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
            _guard_binop(operator, left, right)
            result = super().call_binop(context, operator, left, right)
            _charge(1 + _size(result))
            return result

        def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
            _guard_args(getattr(__obj, "__name__", ""), getattr(__obj, "__self__", None), args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
            _charge(1 + _size(result))
            return result

        def wrap_str_format(self, value: Any):
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            fmt = value.__self__

            def guarded(*args: Any, **kwargs: Any) -> str:
                _guard_args(value.__name__, fmt, args, kwargs)
                result = wrapped(*args, **kwargs)
                _charge(1 + len(result))
                return result

            return guarded

        def _parse(self, source, name, filename):
            return _Metered().visit(super()._parse(source, name, filename))

    class _Metered(NodeTransformer):
        """``for x in ITER`` -> ``for x in __llmquant_loop(ITER, text in the body)``;
        ``a ~ b`` -> ``__llmquant_sized(a ~ b)`` (Jinja2's sandbox cannot intercept ``~``)."""

        def visit_For(self, node):
            self.generic_visit(node)
            text = sum(len(d.data) for b in node.body for d in b.find_all(nodes.TemplateData))
            text += sum(len(b.data) for b in node.body if isinstance(b, nodes.TemplateData))
            node.iter = nodes.Call(nodes.Name("__llmquant_loop", "load"), [node.iter, nodes.Const(text)],
                                   [], None, None)
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return nodes.Call(nodes.Name("__llmquant_sized", "load"), [node], [], None, None)

    class GenerationTag(ext.Extension):
        """Hugging Face's ``{% generation %}...{% endgeneration %}`` (marks training targets): pass-through."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = StrictSandbox(loader=BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                        extensions=[ext.loopcontrols, GenerationTag], autoescape=False)
    env.filters = {name: _guard_filter(name, fn) for name, fn in env.filters.items()}
    env.filters["tojson"] = _guard_filter("tojson", _tojson)
    env.globals.pop("lipsum", None)  # lipsum(n) makes n paragraphs; no chat template uses it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["__llmquant_loop"] = _loop
    env.globals["__llmquant_sized"] = _sized
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
    except Exception as exc:  # noqa: BLE001 — a hostile template can break the compiler (deep nesting, ...)
        raise ChatTemplateError(f"cannot parse it: {type(exc).__name__}: {exc}") from None


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
    from jinja2.exceptions import SecurityError

    compiled = _compile(template or CHATML_TEMPLATE)
    token = _budget.set(_Budget())
    try:
        parts = []
        for chunk in compiled.generate(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                       add_generation_prompt=add_generation_prompt, **extra):
            _charge(len(chunk))
            parts.append(chunk)
        return "".join(parts)
    except SecurityError as exc:
        raise ChatTemplateError(f"refused by the sandbox: {exc}") from None
    except ChatTemplateError:
        raise
    except RecursionError:
        raise ChatTemplateError("cannot render it: recursion too deep") from None
    except Exception as exc:  # noqa: BLE001 — whatever the template's code raises is the template's error
        raise ChatTemplateError(f"cannot render it: {type(exc).__name__}: {_one_line(exc)}") from None
    finally:
        _budget.reset(token)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


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
