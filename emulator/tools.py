"""Function (tool) calling: the functions a request offers, whether the answer calls one, its arguments.

Request (chat completions): ``tools``, a non-empty list of ``{"type": "function", "function": {"name",
"description"?, "parameters"?}}`` (``type`` may be left out, as vLLM defaults it; ``parameters`` a JSON
Schema, ``{"type": "object"}`` when absent), and ``tool_choice``: ``"auto"`` (the default with tools),
``"required"``, ``"none"`` or ``{"type": "function", "function": {"name": ...}}``. Refused with 400 as
vLLM refuses them: ``tools: []`` (see :mod:`emulator.validation`), a tool of another type or a function
without a name, ``tool_choice`` without ``tools`` (except ``"none"``), an unknown ``tool_choice`` value
and a named choice that names no tool. The tools count toward the prompt tokens (their JSON text), as a
template renders them into the prompt. A ``parameters`` schema that is not a valid JSON Schema is a 400
(vLLM's grammar message) once a call to that function is to be answered (for ``"required"``: any
function's).

Which answer calls a function, deterministically from the last user message's text (the "prompt"):

* a named ``tool_choice``: always that function;
* ``"required"``: the first function (in ``tools`` order) whose name the prompt mentions
  (case-insensitive), else the first function;
* ``"auto"``: the first function the prompt mentions; else, when the prompt has the word ``call`` or says
  ``use the tool`` / ``use a tool``, the first function; else no call: text, as without tools. When the
  request continues a final assistant message (``continue_final_message``), ``"auto"`` never calls:
  the model is in the middle of its text;
* ``"none"`` or no tools: no call.

A call is one function call, ``{"id": "call_<hex>", "type": "function", "function": {"name",
"arguments"}}``; the arguments are the JSON text of the document :mod:`emulator.schema_output` builds
for ``parameters`` (as for structured output: deterministic per request, checked against the schema).
The message's ``content`` is ``null`` and ``finish_reason`` is ``"tool_calls"`` (``"length"`` when the
budget cut the arguments). Real vLLM differs in two details a client must tolerate: with a named or
``"required"`` choice it sends ``content: ""``, and with a named choice ``finish_reason: "stop"``; key on
``tool_calls``, not on ``finish_reason``.

The scripted bad call: the JSON faults (``fault_script=["bad_json"]`` or ``fault_kinds=["bad_json"]``
with ``fault_rate``, as for structured output) spoil the arguments of a call: ``bad_json`` gives JSON
that breaks ``parameters`` (the first required property missing, else something worse; not JSON at all
when the schema accepts any JSON), ``broken_json`` the JSON cut in half. A repair request (the answer
given back, then a user message) is answered normally once the script has moved on.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from emulator.errors import ApiError
from emulator.schema_output import Facts
from emulator.structured import check_schema, schema_document

CHOICES = ("auto", "required", "none")
CALL_WORDS = re.compile(r"\bcall\b|\buse (?:the|a) tool\b", re.IGNORECASE)
NO_PARAMETERS: dict[str, Any] = {"type": "object"}
NAMED_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    parameters: dict[str, Any] | None = None

    @property
    def schema(self) -> dict[str, Any]:
        return NO_PARAMETERS if self.parameters is None else self.parameters


@dataclass(frozen=True, slots=True)
class Tools:
    """The functions a request offers and how the answer may call them."""

    functions: tuple[Function, ...]
    choice: str  # "auto", "required", "none" or "named"
    named: str | None = None  # the function a named tool_choice forces
    chars: int = 0  # characters of the tools' JSON text (prompt tokens)


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text (unless a fault spoiled it)
    id: str = ""

    def body(self) -> dict[str, Any]:
        """The call as a chat completion message's ``tool_calls`` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """The tools of a chat completions body (None: none offered, or only ``tool_choice: "none"``)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice is not None and choice != "none":
            raise ApiError(400, "When using `tool_choice`, `tools` must be set.", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "`tools` must be a list of function tools.", param="tools")
    functions = tuple(_function(tool, index) for index, tool in enumerate(tools))
    chars = len(json.dumps(tools, ensure_ascii=False))
    if choice is None or choice in CHOICES:
        return Tools(functions, choice or "auto", chars=chars)
    if not isinstance(choice, dict):
        raise ApiError(
            400,
            f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or "required" '
            "are supported.",
            param="tool_choice",
        )
    function = choice.get("function")
    if not isinstance(function, dict):
        raise ApiError(
            400,
            f"Invalid value for `function`: `{function}` in `tool_choice`! {NAMED_USAGE}",
            param="tool_choice",
        )
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(
            400,
            f"Expected a non-empty `name` in `function` in `tool_choice`! {NAMED_USAGE}",
            param="tool_choice",
        )
    if all(f.name != name for f in functions):
        raise ApiError(
            400,
            "The tool specified in `tool_choice` does not match any of the specified `tools`",
            param="tool_choice",
        )
    return Tools(functions, "named", name, chars)


def called(tools: Tools | None, prompt: str, *, continuing: bool = False) -> Function | None:
    """The function the answer calls, or None (see the module's rules)."""
    if tools is None or tools.choice == "none":
        return None
    if tools.choice == "named":
        return next(f for f in tools.functions if f.name == tools.named)
    lowered = prompt.lower()
    mentioned = next((f for f in tools.functions if f.name.lower() in lowered), None)
    if tools.choice == "required":
        for function in tools.functions:  # vLLM builds one grammar of every function's parameters
            check_schema(function.schema)
        return mentioned or tools.functions[0]
    if continuing:
        return None
    if mentioned is not None:
        return mentioned
    return tools.functions[0] if CALL_WORDS.search(prompt) else None


def make_call(function: Function, facts: Facts, *, fault: str | None = None) -> ToolCall:
    """The call of ``function``: arguments built for its parameters (spoiled by a JSON ``fault``)."""
    arguments = schema_document(function.schema, facts, fault=fault)
    return ToolCall(function.name, arguments, f"call_{uuid.uuid4().hex[:24]}")


def _function(tool: Any, index: int) -> Function:
    where = f"tools[{index}]"
    if not isinstance(tool, dict):
        raise ApiError(400, f"`{where}` must be an object.", param="tools")
    kind = tool.get("type", "function")
    if kind != "function":
        raise ApiError(400, f"`{where}.type`: Input should be 'function', got {kind!r}.", param="tools")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ApiError(400, f"`{where}.function`: Field required (an object with a `name`).", param="tools")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"`{where}.function.name`: Field required (a non-empty string).", param="tools")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ApiError(400, f"`{where}.function.parameters` must be a JSON Schema object.", param="tools")
    return Function(name, parameters)
