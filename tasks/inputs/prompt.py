"""The prompt record: one row of the prompts manifest (README.md, "Prompts manifest"), or the built-in
caption prompt when no prompts manifest is given."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Prompt:
    """One row of the prompts manifest (or the built-in caption prompt)."""

    prompt_id: str
    prompt: str
    task: str
    image_id: str | None = None
    system: str | None = None
    json_schema: str | None = None
    max_tokens: int | None = None
    reasoning: bool | None = None  # None: the run's --reasoning
    image_ids: tuple[str, ...] | None = None  # several images in one message, in this order
    parent_prompt_id: str | None = None  # asked after this prompt, with its conversation (a chain)
    tools: str | None = None  # JSON: OpenAI-style function tools, checked (tasks/inputs/tools.py)
    tool_choice: str | None = None  # auto, required, none or a function's name (None: the server's, auto)
    prefill: str | None = None  # the answer's opening: the request ends with it, continued


DEFAULT_PROMPT = Prompt(
    prompt_id="caption",
    prompt="Describe this image in one or two sentences.",
    task="caption",
)
