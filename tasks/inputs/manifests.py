"""Read and validate the images and prompts manifests (README.md, "Manifests").

Validation reads only the id columns of the images manifest, so it costs little even for millions of
rows; the heavy ``image`` column is streamed later in batches by ``ImagesManifest.iter_batches``.
Every problem raises ``ManifestError`` naming the file, the column and the rows (0-based).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.errors import MAX_LISTED, ManifestError
from tasks.errors import rows_phrase as _rows
from tasks.inputs.chains import order_chains
from tasks.inputs.json_schemas import schema_problem
from tasks.inputs.prompt import Prompt
from tasks.inputs.tools import check_tool_choice, check_tools
from tasks.row import OUTPUT_SCHEMA

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


def parquet_files(path: Path, what: str) -> list[Path]:
    """The Parquet files of a manifest: the file itself, or every ``*.parquet`` file below a directory.

    Like pyarrow.dataset, names starting with ``.`` or ``_`` are skipped; other files (the images
    themselves, a README) are not part of the manifest.
    """
    if not path.exists():
        raise ManifestError(f"{what} manifest {path} does not exist")
    if path.is_file():
        return [path]
    below = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    files = [p for p in below if p.suffix.lower() in PARQUET_SUFFIXES]
    if not files:
        others = f" (only {len(below)} other files, such as {below[0].relative_to(path)})" if below else ""
        raise ManifestError(f"{what} manifest directory {path} holds no Parquet files (*.parquet){others}")
    return files


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path} is not a readable Parquet file: {exc}") from None


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or _is_string_view(t)


def _is_string_view(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_string_view", None)  # pyarrow 16+
    return bool(is_view and is_view(t))


def _is_id(t: pa.DataType) -> bool:
    return _is_text(t) or pa.types.is_integer(t) or pa.types.is_null(t)


def _is_image(t: pa.DataType) -> bool:
    if _is_text(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return bool(names & {"bytes", "path"}) and names <= {"bytes", "path"}
    return False


def _plain(t: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column (pandas' ``category``) is a column of its values."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _check_column(schema: pa.Schema, name: str, ok: object, expected: str, path: Path) -> None:
    if name not in schema.names:
        raise ManifestError(f"{path}: missing column {name!r} (columns: {', '.join(schema.names)})")
    t = schema.field(name).type
    if not ok(_plain(t)):  # type: ignore[operator]
        raise ManifestError(f"{path}: column {name!r} has type {t}; expected {expected}")


def _as_text(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """As ``string``: integers, and large_string (pandas 3's strings), string_view or dictionary too."""
    return column if pa.types.is_string(column.type) else pc.cast(column, pa.string())


def _decoded(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return pc.cast(column, column.type.value_type) if pa.types.is_dictionary(column.type) else column


def _common_carry_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type a carried column gets when its files differ in width or encoding only (pandas 2's
    ``string`` beside pandas 3's ``large_string``, int32 beside int64, a ``category`` beside plain
    values, a file where it is all null): pyarrow's permissive promotion; None if there is none."""
    if a.equals(b):
        return a
    try:
        one = pa.unify_schemas(
            [pa.schema([("c", _plain(a))]), pa.schema([("c", _plain(b))])], promote_options="permissive"
        )
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return None
    return one.field("c").type


@dataclass(frozen=True)
class ImagesManifest:
    """A validated images manifest: which files, which columns, how many rows."""

    path: Path
    files: tuple[Path, ...]
    id_column: str
    image_column: str
    carry: tuple[str, ...]
    carry_schema: pa.Schema
    num_rows: int
    ids: pa.ChunkedArray | None  # every image_id as string, in manifest order; None once checked

    @property
    def base_dir(self) -> Path:
        """Relative image paths resolve against the manifest's folder (the directory itself if one)."""
        return self.path if self.path.is_dir() else self.path.parent

    def without_ids(self) -> ImagesManifest:
        """The same manifest without its ids in memory (a run needs them only to check the prompts)."""
        return replace(self, ids=None)

    def iter_batches(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        """Stream (image_id as string, image, carried columns) in manifest order."""
        columns = [self.id_column, self.image_column, *self.carry]
        for file in self.files:
            for batch in _open(file).iter_batches(batch_size=batch_size, columns=columns):
                batch = batch.set_column(0, self.id_column, _as_text(batch.column(self.id_column)))
                batch = batch.set_column(1, self.image_column, _decoded(batch.column(self.image_column)))
                for i, field in enumerate(self.carry_schema, start=2):
                    if not batch.column(i).type.equals(field.type):  # a file of another width
                        batch = batch.set_column(i, field.name, pc.cast(batch.column(i), field.type))
                yield batch


def read_images_manifest(
    path: str | Path, *, id_column: str = "image_id", image_column: str = "image", carry: Sequence[str] = ()
) -> ImagesManifest:
    root = Path(path)
    files = parquet_files(root, "images")
    for name in carry:
        if name in (id_column, image_column):
            raise ManifestError(f"--carry {name}: the {name!r} column is already in the output")
        if name in OUTPUT_SCHEMA.names:
            raise ManifestError(
                f"--carry {name}: the output has a {name!r} column of its own; rename the manifest's "
                "column to carry it"
            )
    carry_fields: dict[str, pa.Field] = {}
    chunks: list[pa.Array] = []
    for file in files:
        schema = _open(file).schema_arrow
        _check_column(schema, id_column, _is_id, "string or integer", file)
        _check_column(schema, image_column, _is_image, "string, binary or struct<bytes, path>", file)
        for name in carry:
            if name not in schema.names:
                raise ManifestError(
                    f"{file}: --carry column {name!r} is missing (columns: {', '.join(schema.names)})"
                )
            # nullable whatever a file says: another file (or a failed row) may have nulls there
            field = schema.field(name).with_nullable(True)
            if name in carry_fields:
                common = _common_carry_type(carry_fields[name].type, field.type)
                if common is None:
                    raise ManifestError(
                        f"{file}: --carry column {name!r} has type {field.type}, "
                        f"but {carry_fields[name].type} in another file"
                    )
                field = field.with_type(common)
            carry_fields[name] = field
        ids = _as_text(pq.read_table(file, columns=[id_column]).column(id_column))
        nulls = pc.indices_nonzero(pc.is_null(ids)).to_pylist()
        if nulls:
            raise ManifestError(f"{file}: column {id_column!r} is null in {_rows(nulls)}")
        chunks.extend(ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids])
    all_ids = pa.chunked_array(chunks, type=pa.string())
    _check_unique(all_ids, files, id_column, "images")
    return ImagesManifest(
        path=root,
        files=tuple(files),
        id_column=id_column,
        image_column=image_column,
        carry=tuple(carry),
        carry_schema=pa.schema([carry_fields[name] for name in carry]),
        num_rows=len(all_ids),
        ids=all_ids,
    )


def _check_unique(ids: pa.ChunkedArray, files: Sequence[Path], column: str, what: str) -> None:
    # sorted neighbours, not a hash table: at a million ids this needs about half the memory
    ordered = ids.take(pc.sort_indices(ids)).combine_chunks()
    if len(ordered) < 2:
        return
    same = pc.equal(ordered.slice(0, len(ordered) - 1), ordered.slice(1))
    if not pc.any(same).as_py():
        return
    dupes = pc.unique(ordered.slice(0, len(ordered) - 1).filter(same))
    positions = pc.indices_nonzero(pc.is_in(ids, value_set=dupes)).to_pylist()
    where = files[0] if len(files) == 1 else f"{what} manifest ({len(files)} files, rows counted across them)"
    values = ", ".join(repr(v) for v in dupes.to_pylist()[:MAX_LISTED])
    raise ManifestError(f"{where}: duplicate {column} values {values} in {_rows(positions)}")


STRING, INT64, BOOL, STRINGS = pa.string(), pa.int64(), pa.bool_(), pa.list_(pa.string())
PROMPT_COLUMNS: dict[str, tuple[object, str, bool, pa.DataType]] = {
    # column: (type check, expected, required, the type every file's column is cast to)
    "prompt_id": (_is_id, "string", True, STRING),
    "prompt": (_is_text, "string", True, STRING),
    "task": (_is_text, "string", False, STRING),
    "image_id": (_is_id, "string", False, STRING),
    "system": (_is_text, "string", False, STRING),
    "json_schema": (_is_text, "string (a JSON Schema)", False, STRING),
    "max_tokens": (pa.types.is_integer, "integer", False, INT64),
    "reasoning": (pa.types.is_boolean, "boolean", False, BOOL),
    "image_ids": (
        lambda t: pa.types.is_list(t) or pa.types.is_large_list(t),
        "list of strings",
        False,
        STRINGS,
    ),
    "parent_prompt_id": (_is_id, "string", False, STRING),
    "tools": (_is_text, "string (a JSON list of function tools)", False, STRING),
    "tool_choice": (_is_text, "string", False, STRING),
    "prefill": (_is_text, "string", False, STRING),
}


def read_prompts_manifest(path: str | Path) -> list[Prompt]:
    """Read the whole prompts manifest (prompts are text: small beside the images)."""
    files = parquet_files(Path(path), "prompts")
    tables = []
    for file in files:
        schema = _open(file).schema_arrow
        present = []
        for name, (check, expected, required, _) in PROMPT_COLUMNS.items():
            if required or name in schema.names:
                _check_column(schema, name, check, expected, file)
                present.append(name)
        table = pq.read_table(file, columns=present)
        for i, name in enumerate(table.column_names):  # one type per column, whatever width each file wrote
            try:
                table = table.set_column(i, name, pc.cast(_decoded(table[name]), PROMPT_COLUMNS[name][3]))
            except pa.ArrowInvalid as exc:  # e.g. a uint64 max_tokens beyond int64
                raise ManifestError(f"{file}: column {name!r}: {exc}") from None
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    where = files[0] if len(files) == 1 else Path(path)
    nulls = pc.indices_nonzero(pc.is_null(table["prompt_id"])).to_pylist()
    if nulls:
        raise ManifestError(f"{where}: column 'prompt_id' is null in {_rows(nulls)}")
    _check_unique(table["prompt_id"], files, "prompt_id", "prompts")

    prompts: list[Prompt] = []
    empty: list[int] = []
    bad_tokens: list[int] = []
    bad_ids: list[int] = []
    for row, rec in enumerate(table.to_pylist()):
        text = rec.get("prompt")
        if text is None or not text.strip():
            empty.append(row)
            continue
        if rec.get("max_tokens") is not None and rec["max_tokens"] < 1:
            bad_tokens.append(row)
        schema = rec.get("json_schema")
        if schema is not None:
            _check_schema(schema, where, f"row {row} (prompt {rec['prompt_id']!r})")
        tools, prefill = _tools(rec, where, row), rec.get("prefill")
        _check_combination(rec, tools, where, row)
        image_id = rec.get("image_id")
        image_ids = rec.get("image_ids")
        if image_ids is not None:
            image_ids = tuple(str(i) for i in image_ids if i is not None)
            if not image_ids or image_id is not None:
                bad_ids.append(row)
        prompts.append(
            Prompt(
                prompt_id=rec["prompt_id"],
                prompt=text,
                task=rec.get("task") or _default_task(image_id, image_ids, rec.get("parent_prompt_id")),
                image_id=image_id,
                system=rec.get("system"),
                json_schema=schema,
                max_tokens=rec.get("max_tokens"),
                reasoning=rec.get("reasoning"),
                image_ids=image_ids,
                parent_prompt_id=rec.get("parent_prompt_id"),
                tools=tools,
                tool_choice=rec.get("tool_choice"),
                prefill=prefill,
            )
        )
    if empty:
        raise ManifestError(f"{where}: column 'prompt' is null or empty in {_rows(empty)}")
    if bad_tokens:
        raise ManifestError(f"{where}: column 'max_tokens' must be at least 1; see {_rows(bad_tokens)}")
    if bad_ids:
        raise ManifestError(
            f"{where}: column 'image_ids' must list at least one image, and a prompt with image_ids "
            f"cannot also set image_id; see {_rows(bad_ids)}"
        )
    if not prompts:
        raise ManifestError(f"{where}: the prompts manifest has no rows")
    return order_chains(prompts, where)


def _default_task(image_id: str | None, image_ids: object, parent: str | None) -> str:
    return "caption" if image_id is None and image_ids is None and parent is None else "qa"


def _check_schema(text: str, where: Path, prompt: str) -> None:
    """A prompt's ``json_schema``: JSON, and a schema whose every ``$ref`` resolves inside it."""
    try:
        reason = schema_problem(json.loads(text))
    except ValueError as exc:
        reason = str(exc)
    if reason is not None:
        raise ManifestError(f"{where}: column 'json_schema' in {prompt} is not a valid JSON Schema: {reason}")


def _tools(rec: dict[str, Any], where: Path, row: int) -> str | None:
    """The prompt's checked tools (tasks/inputs/tools.py), and its tool_choice checked against them."""
    tools, choice = rec.get("tools"), rec.get("tool_choice")
    prompt = f"row {row} (prompt {rec['prompt_id']!r})"
    try:
        tools = check_tools(tools) if tools is not None else None
    except ValueError as exc:
        raise ManifestError(f"{where}: column 'tools' in {prompt}: {exc}") from None
    try:
        if choice is not None:
            check_tool_choice(choice, tools)
    except ValueError as exc:
        raise ManifestError(f"{where}: column 'tool_choice' in {prompt}: {exc}") from None
    return tools


def _check_combination(rec: dict[str, Any], tools: str | None, where: Path, row: int) -> None:
    """Columns that do not go together in one prompt."""
    prompt = f"row {row} (prompt {rec['prompt_id']!r})"
    prefill = rec.get("prefill")
    if tools is not None and rec.get("json_schema") is not None:
        raise ManifestError(
            f"{where}: {prompt} has both 'tools' and 'json_schema': give one (a json_schema is sent as a "
            "function with --structured-output tools)"
        )
    if prefill is not None and tools is not None:
        raise ManifestError(
            f"{where}: {prompt} has both 'prefill' and 'tools': a prefill opens a text answer, and a "
            "function call has none"
        )
    if prefill is not None and rec.get("json_schema") is not None:
        raise ManifestError(
            f"{where}: {prompt} has both 'prefill' and 'json_schema': the server holds only what the "
            "model writes after a prefill to the schema, so prefill and answer would not be one JSON "
            "document; give the json_schema alone (its answer is JSON already), or a prefill without it"
        )
    if prefill == "":
        raise ManifestError(f"{where}: column 'prefill' is empty in {prompt}; leave it null for no prefill")


def check_prompt_images(
    prompts: Sequence[Prompt], images: ImagesManifest, where: str | Path, max_images: int = 4
) -> None:
    """Every image a prompt names must be in the images manifest; at most ``max_images`` per prompt."""
    too_many = [row for row, p in enumerate(prompts) if p.image_ids and len(p.image_ids) > max_images]
    if too_many:
        raise ManifestError(
            f"{where}: column 'image_ids' lists more images than --max-images-per-prompt ({max_images}, the "
            f"server's per-prompt limit) in {_rows(too_many)}"
        )
    named = [(row, p.image_id) for row, p in enumerate(prompts) if p.image_id is not None]
    named += [(row, i) for row, p in enumerate(prompts) for i in p.image_ids or ()]
    if not named:
        return
    if images.ids is None:
        raise ValueError("check_prompt_images needs the manifest's ids (read it again)")
    wanted = pa.array([image_id for _, image_id in named], type=pa.string())
    known = pc.is_in(wanted, value_set=images.ids.combine_chunks()).to_pylist()
    unknown = [(row, image_id) for (row, image_id), ok in zip(named, known, strict=True) if not ok]
    if unknown:
        values = ", ".join(repr(v) for _, v in unknown[:MAX_LISTED])
        raise ManifestError(
            f"{where}: column 'image_id' names images not in the images manifest ({values}) "
            f"in {_rows([row for row, _ in unknown])}"
        )
