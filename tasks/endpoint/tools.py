"""Function calling on the wire (README.md, "Function calling"): a prompt's tools in a Chat Completions
or Responses body, a ``json_schema`` sent as one function the model must call (``--structured-output
tools``), and an answer's calls checked against the functions' ``parameters``.

The tools come checked and in one form from the prompts manifest (tasks/inputs/tools.py). A call whose
arguments do not parse or validate is an ``invalid_json`` failure, repaired once like a JSON answer
(tasks/endpoint/sender.py): the call given back as the assistant's text, since vLLM's ``role: "tool"``
turn would need the function's result, which vlmbatch does not have.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from tasks.endpoint.answers import Answer, ToolCall
from tasks.endpoint.structured import compact, mismatch, parse_json
from tasks.errors import RequestFailure
from tasks.inputs.tools import CHOICES

SCHEMA_FUNCTION = "answer"  # the function a json_schema is sent as (the name response_format uses too)
CALL_REPAIR_PROMPT = (
    "Your function call was not valid: {error}. "
    "Call the function again, with arguments that match its parameters' JSON Schema."
)


def schema_tools(schema_text: str) -> str:
    """A ``json_schema`` as the tools of one function whose parameters it is."""
    function = {
        "name": SCHEMA_FUNCTION,
        "description": "Give your answer as this function's arguments.",
        "parameters": json.loads(schema_text),
    }
    return compact([{"type": "function", "function": function}])


def chat_tools(tools: str, choice: str | None) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` of a Chat Completions body (no choice: the server's, auto)."""
    fields: dict[str, Any] = {"tools": json.loads(tools)}
    if choice is not None:
        named = {"type": "function", "function": {"name": choice}}
        fields["tool_choice"] = choice if choice in CHOICES else named
    return fields


def responses_tools(tools: str, choice: str | None) -> dict[str, Any]:
    """The same for the Responses API, whose function tools are flat: ``{"type", "name", ...}``."""
    fields: dict[str, Any] = {"tools": [{"type": "function", **t["function"]} for t in json.loads(tools)]}
    if choice is not None:
        fields["tool_choice"] = choice if choice in CHOICES else {"type": "function", "name": choice}
    return fields


@lru_cache(maxsize=256)
def _parameters(tools: str) -> dict[str, str | None]:
    """Each function's parameters schema as JSON text (the validator cache's key), by name."""
    found = {}
    for tool in json.loads(tools):
        schema = tool["function"].get("parameters")
        found[tool["function"]["name"]] = None if schema is None else json.dumps(schema, sort_keys=True)
    return found


def _arguments(call: ToolCall) -> Any:
    """The call's arguments; none at all (a function without parameters, on some servers) is ``{}``."""
    return {} if not call.arguments.strip() else parse_json(call.arguments, f"the call of {call.name!r}")


def checked_calls(calls: Sequence[ToolCall], tools: str) -> str:
    """The ``tool_calls`` column: ``[{"name", "arguments"}]`` with the arguments parsed, if every call
    names one of ``tools`` and its arguments validate; else an ``invalid_json`` failure."""
    functions = _parameters(tools)
    checked = []
    for call in calls:
        if call.name not in functions:
            raise RequestFailure(
                "invalid_json",
                f"the answer calls {call.name!r}, which is not one of the prompt's functions "
                f"({', '.join(functions)})",
            )
        arguments = _arguments(call)
        schema = functions[call.name]
        if schema is not None and (
            failure := mismatch(arguments, schema, f"the call of {call.name!r}", "its parameters")
        ):
            raise failure
        checked.append({"name": call.name, "arguments": arguments})
    return compact(checked)


def schema_document(answer: Answer) -> str | None:
    """The JSON document answering a ``json_schema`` prompt: the arguments of the call of the schema's
    function (``--structured-output tools``), else the answer's text."""
    for call in answer.tool_calls:
        if call.name == SCHEMA_FUNCTION:
            return call.arguments
    return answer.text


def calls_text(calls: Sequence[ToolCall]) -> str:
    """Calls as the assistant's text, to give them back in a repair request."""
    return "\n".join(f"{call.name}({call.arguments})" for call in calls)
