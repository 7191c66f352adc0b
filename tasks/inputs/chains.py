"""Multi-turn chains: a prompt with ``parent_prompt_id`` is asked after its parent, in its conversation.

For each image, a chained prompt is the next user turn of its parent's conversation::

    [system] · user (the image(s) + the root prompt) · assistant (the root's answer)
             · user (the next prompt) · assistant (its answer) · … · user (this prompt)

so roles alternate strictly, first and last user, as the endpoint requires. The system prompt is the
prompt's own ``system``, else its nearest ancestor's. A chain's prompts are asked of the same images:
a child without ``image_id`` inherits its parent's; a child with one narrows a parent asked of every
image. Multi-image prompts (``image_ids``) cannot be chained, and a prompt with ``tools`` cannot have
children (a function call is continued only with the function's result). A prefill is part of the
answer its children see: the row's text, prefill included.

``order_chains`` checks all that when the manifest is read and orders prompts parents first, so a job,
or a ``--limit`` cut of one, never holds a child without its parent. The request key of a child covers
its whole conversation, its ancestors' answers included (tasks/endpoint/requests.py): a parent answered anew
means its children are asked anew.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tasks.errors import MAX_LISTED, ManifestError, rows_phrase
from tasks.inputs.prompt import Prompt


@dataclass(frozen=True, slots=True)
class Turn:
    """An earlier turn of a conversation: the prompt asked and the answer it got."""

    prompt: Prompt
    answer: str


def order_chains(prompts: list[Prompt], where: str | Path) -> list[Prompt]:
    """The prompts, parents before children (otherwise in manifest order), children's image_id resolved.

    Raises ManifestError for an unknown parent, a cycle, a multi-image prompt in a chain, or a child
    that names another image than its parent.
    """
    if all(p.parent_prompt_id is None for p in prompts):
        return prompts
    rows = {p.prompt_id: row for row, p in enumerate(prompts)}
    by_id = {p.prompt_id: p for p in prompts}
    unknown = [row for row, p in enumerate(prompts) if p.parent_prompt_id not in (None, *by_id)]
    if unknown:
        names = ", ".join(repr(prompts[row].parent_prompt_id) for row in unknown[:MAX_LISTED])
        raise ManifestError(
            f"{where}: column 'parent_prompt_id' names prompts not in the prompts manifest ({names}) "
            f"in {rows_phrase(unknown)}"
        )
    parents = {p.parent_prompt_id for p in prompts}
    multi = [
        row for row, p in enumerate(prompts) if p.image_ids and (p.parent_prompt_id or p.prompt_id in parents)
    ]
    if multi:
        raise ManifestError(
            f"{where}: column 'parent_prompt_id': a multi-image prompt (image_ids) cannot be part of a "
            f"chain; see {rows_phrase(multi)}"
        )
    calling = [row for row, p in enumerate(prompts) if p.tools is not None and p.prompt_id in parents]
    if calling:
        names = ", ".join(repr(prompts[row].prompt_id) for row in calling[:MAX_LISTED])
        raise ManifestError(
            f"{where}: column 'parent_prompt_id': a prompt with tools cannot have chained prompts after it "
            "(its answer may be a function call, which a conversation continues only with the function's "
            f"result, and vlmbatch runs no functions): {names} in {rows_phrase(calling)}"
        )
    resolved: dict[str, Prompt] = {}
    ordered: list[Prompt] = []
    for prompt in prompts:
        path: list[Prompt] = []  # from this prompt up to the first ancestor already resolved (or a root)
        current: Prompt | None = prompt
        while current is not None and current.prompt_id not in resolved:
            if current in path:
                cycle = path[path.index(current) :]
                names = " → ".join(repr(p.prompt_id) for p in [*cycle, current])
                raise ManifestError(
                    f"{where}: column 'parent_prompt_id' forms a cycle ({names}) in "
                    f"{rows_phrase(sorted(rows[p.prompt_id] for p in cycle))}"
                )
            path.append(current)
            current = by_id[current.parent_prompt_id] if current.parent_prompt_id is not None else None
        for child in reversed(path):
            if child.parent_prompt_id is not None:
                child = _inherit(child, resolved[child.parent_prompt_id], rows[child.prompt_id], where)
            resolved[child.prompt_id] = child
            ordered.append(child)
    return ordered


def _inherit(child: Prompt, parent: Prompt, row: int, where: str | Path) -> Prompt:
    if child.image_id is None:
        return replace(child, image_id=parent.image_id)
    if parent.image_id is not None and parent.image_id != child.image_id:
        raise ManifestError(
            f"{where}: row {row} (prompt {child.prompt_id!r}) names image {child.image_id!r} but its parent "
            f"{parent.prompt_id!r} is asked of image {parent.image_id!r} only"
        )
    return child


def children_of(prompts: Iterable[Prompt]) -> dict[str, list[Prompt]]:
    """Each parent's children among ``prompts``, in order."""
    found: dict[str, list[Prompt]] = {}
    for p in prompts:
        if p.parent_prompt_id is not None:
            found.setdefault(p.parent_prompt_id, []).append(p)
    return found


def descendants(prompt: Prompt, children: dict[str, list[Prompt]]) -> list[Prompt]:
    """Every prompt below ``prompt`` in ``children``, parents first."""
    found: list[Prompt] = []
    stack = list(reversed(children.get(prompt.prompt_id, ())))
    while stack:
        p = stack.pop()
        found.append(p)
        stack.extend(reversed(children.get(p.prompt_id, ())))
    return found


def group_by_root(prompts: Sequence[Prompt]) -> list[list[Prompt]]:
    """Prompts (ordered parents first) grouped into one list per chain root, each parents first."""
    root: dict[str, str] = {}
    groups: dict[str, list[Prompt]] = {}
    for p in prompts:
        parent = p.parent_prompt_id
        top = root.get(parent, p.prompt_id) if parent is not None else p.prompt_id
        root[p.prompt_id] = top
        groups.setdefault(top, []).append(p)
    return list(groups.values())


@dataclass(slots=True)
class Pending:
    """A job's prompts still to ask, and the stored answers of its done parents (by prompt_id)."""

    prompts: list[Prompt]
    answers: dict[str, str]


def history_of(prompt: Prompt, answers: dict[str, str], by_id: dict[str, Prompt]) -> tuple[Turn, ...] | None:
    """The earlier turns of ``prompt``'s conversation from known answers; None if an ancestor's is unknown."""
    turns: list[Turn] = []
    parent = prompt.parent_prompt_id
    while parent is not None:
        if parent not in answers or parent not in by_id:
            return None
        turns.append(Turn(by_id[parent], answers[parent]))
        parent = by_id[parent].parent_prompt_id
    return tuple(reversed(turns))


def pending_prompts(
    prompts: Sequence[Prompt],
    is_done: Callable[[Prompt, tuple[Turn, ...]], bool],
    stored_text: Callable[[Prompt], str | None],
) -> Pending:
    """Which of a job's prompts (ordered parents first) still need asking on a rerun.

    A prompt is done when ``is_done`` says so for its conversation; a chained prompt can only be done
    if its parent is, since its conversation holds the parent's stored answer (``stored_text``). A
    done parent whose answer cannot be read back is asked again, with its children.
    """
    parents = {p.parent_prompt_id for p in prompts}
    by_id = {p.prompt_id: p for p in prompts}
    answers: dict[str, str] = {}
    todo: list[Prompt] = []
    for p in prompts:
        parent = p.parent_prompt_id
        history = history_of(p, answers, by_id) if parent is None or parent in answers else None
        if history is not None and is_done(p, history):
            text = stored_text(p) if p.prompt_id in parents else ""
            if text is not None:
                answers[p.prompt_id] = text
                continue
        todo.append(p)
    return Pending(todo, answers)
