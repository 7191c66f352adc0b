"""A prompt's function tools (README.md, "Function calling"): the prompts manifest's ``tools`` and
``tool_choice`` checked when it is read, so a bad definition stops the run before anything is sent.

The endpoint would refuse most of these with a 400 for every row (vLLM checks a ``parameters`` schema
only when it builds the grammar of a call), and a function without a usable schema could not have its
calls' arguments validated (the schema check, ``$ref`` included: tasks/inputs/json_schemas.py). What
is kept is the tools in one form, ``{"type": "function", "function": {"name", ...}}``, compact JSON,
from which both APIs' bodies are built (tasks/endpoint/tools.py).
"""

from __future__ import annotations

import json
from typing import Any

from tasks.inputs.json_schemas import schema_problem

CHOICES = ("auto", "required", "none")


def check_tools(text: str) -> str:
    """The tools as compact JSON in one form; ValueError saying what is wrong with them."""
    try:
        tools = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(tools, list):
        raise ValueError(f"must be a JSON list of function tools, not {type(tools).__name__}")
    if not tools:
        raise ValueError("an empty list (the endpoint refuses it): leave the cell null for no tools")
    names: list[str] = []
    checked = [_function(tool, i, names) for i, tool in enumerate(tools)]
    return json.dumps(checked, ensure_ascii=False, separators=(",", ":"))


def _function(tool: Any, index: int, names: list[str]) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(tool, dict):
        raise ValueError(f"{where} is not an object")
    if tool.get("type", "function") != "function":
        raise ValueError(f"{where} has type {tool['type']!r}; only function tools are supported")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ValueError(
            f'{where} has no "function" object: write {{"type": "function", "function": {{"name": ..., '
            '"parameters": {...}}}'
        )
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: the function has no name")
    if name in names:
        raise ValueError(f"{where}: a second function named {name!r}")
    names.append(name)
    if "parameters" in function and function["parameters"] is not None:
        problem = schema_problem(function["parameters"])
        if problem is not None:
            raise ValueError(f"{where}: the parameters of {name!r} are not a valid JSON Schema: {problem}")
    return {"type": "function", "function": function}


def tool_names(tools: str) -> list[str]:
    """The functions' names of checked tools, in order."""
    return [tool["function"]["name"] for tool in json.loads(tools)]


def check_tool_choice(choice: str, tools: str | None) -> None:
    """``choice`` must be auto, required, none or one of the tools' names; ValueError otherwise."""
    if tools is None:
        raise ValueError(f"{choice!r} is set but the prompt has no tools")
    names = tool_names(tools)
    if choice not in CHOICES and choice not in names:
        raise ValueError(
            f"{choice!r} names no tool of the prompt (its functions: {', '.join(names)}; or one of "
            f"{', '.join(CHOICES)})"
        )
