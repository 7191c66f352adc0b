from pathlib import Path

import pyarrow as pa
import pytest

from tasks.errors import ManifestError
from tasks.inputs.manifests import check_prompt_images, read_images_manifest, read_prompts_manifest
from tests.builders import images_manifest, prompts_manifest, write_parquet


def test_images_manifest_file_and_directory(tmp_path: Path) -> None:
    m = images_manifest(tmp_path, {"a": ((10, 10), "red"), "b": ((20, 10), "blue")})
    manifest = read_images_manifest(m)
    assert manifest.ids.to_pylist() == ["a", "b"]
    assert manifest.base_dir == tmp_path
    d = tmp_path / "dir"
    write_parquet(d / "part-0.parquet", {"image_id": ["x"], "image": ["p.jpg"]})
    write_parquet(d / "sub" / "part-1.parquet", {"image_id": ["y"], "image": ["q.jpg"]})
    (d / "_SUCCESS").write_text("")
    manifest = read_images_manifest(d)
    assert manifest.ids.to_pylist() == ["x", "y"]
    assert manifest.base_dir == d
    batches = list(manifest.iter_batches(1))
    assert [b.column(0).to_pylist() for b in batches] == [["x"], ["y"]]


def test_integer_ids_are_cast_to_string(tmp_path: Path) -> None:
    m = write_parquet(tmp_path / "m.parquet", {"image_id": [1, 2], "image": ["a", "b"]})
    manifest = read_images_manifest(m)
    assert manifest.ids.to_pylist() == ["1", "2"]
    assert next(manifest.iter_batches(10)).column(0).to_pylist() == ["1", "2"]


def test_remapped_columns_and_carry(tmp_path: Path) -> None:
    m = write_parquet(tmp_path / "m.parquet", {"key": ["a"], "img": ["a.jpg"], "label": [3]})
    manifest = read_images_manifest(m, id_column="key", image_column="img", carry=["label"])
    assert manifest.carry_schema.names == ["label"]
    with pytest.raises(ManifestError, match=r"missing column 'image_id' \(columns: key, img, label\)"):
        read_images_manifest(m)
    with pytest.raises(ManifestError, match="--carry column 'nope' is missing"):
        read_images_manifest(m, id_column="key", image_column="img", carry=["nope"])


@pytest.mark.parametrize("name", ["text", "status", "model", "run_id"])
def test_carrying_a_column_the_output_has_is_refused_before_anything_is_sent(
    tmp_path: Path, name: str
) -> None:
    m = write_parquet(tmp_path / "m.parquet", {"image_id": ["a"], "image": ["a.jpg"], name: ["x"]})
    with pytest.raises(ManifestError, match=f"--carry {name}: the output has a '{name}' column of its own"):
        read_images_manifest(m, carry=[name])


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (
            {"image_id": [1.5], "image": ["a"]},
            r"column 'image_id' has type double; expected string or integer",
        ),
        (
            {"image_id": ["a"], "image": [3]},
            r"column 'image' has type int64; expected string, binary or struct",
        ),
        ({"image_id": ["a", None, None], "image": ["a", "b", "c"]}, r"'image_id' is null in rows 1, 2"),
        (
            {"image_id": ["a", "b", "a", "b"], "image": list("abcd")},
            r"duplicate image_id values 'a', 'b' in rows 0, 1, 2, 3",
        ),
    ],
)
def test_bad_images_manifests(tmp_path: Path, columns: dict, message: str) -> None:
    m = write_parquet(tmp_path / "m.parquet", columns)
    with pytest.raises(ManifestError, match=message) as err:
        read_images_manifest(m)
    assert str(m) in str(err.value)


def test_duplicates_across_files_and_not_parquet(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "a.parquet", {"image_id": ["x"], "image": ["1"]})
    write_parquet(tmp_path / "d" / "b.parquet", {"image_id": ["x"], "image": ["2"]})
    with pytest.raises(ManifestError, match="duplicate image_id values 'x'"):
        read_images_manifest(tmp_path / "d")
    bogus = tmp_path / "notes.parquet"
    bogus.write_text("image_id,image\n")
    with pytest.raises(ManifestError, match=r"notes.parquet is not a readable Parquet file"):
        read_images_manifest(bogus)
    with pytest.raises(ManifestError, match="does not exist"):
        read_images_manifest(tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="holds no Parquet files"):
        read_images_manifest(tmp_path / "empty")
    (tmp_path / "empty" / "a.jpg").write_bytes(b"jpeg")
    with pytest.raises(
        ManifestError, match=r"holds no Parquet files \(\*.parquet\) \(only 1 other files, such as a.jpg\)"
    ):
        read_images_manifest(tmp_path / "empty")


def test_a_directory_manifest_is_its_parquet_files_the_images_beside_them_ignored(tmp_path: Path) -> None:
    d = tmp_path / "manifests"
    write_parquet(d / "part-0.parquet", {"image_id": ["a"], "image": ["images/a.jpg"]})
    write_parquet(d / "more" / "part-1.PQ", {"image_id": ["b"], "image": ["images/b.jpg"]})
    (d / "images").mkdir()
    (d / "images" / "a.jpg").write_bytes(b"jpeg")
    (d / "README.md").write_text("what these are")
    manifest = read_images_manifest(d)
    assert sorted(p.name for p in manifest.files) == ["part-0.parquet", "part-1.PQ"]
    assert manifest.num_rows == 2


def test_hugging_face_struct_column_is_accepted(tmp_path: Path) -> None:
    struct = pa.array(
        [{"bytes": b"x", "path": None}], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    m = write_parquet(tmp_path / "hf.parquet", pa.table({"image_id": ["a"], "image": struct}))
    assert read_images_manifest(m).num_rows == 1


def test_prompts_manifest_defaults_and_types(tmp_path: Path) -> None:
    p = prompts_manifest(
        tmp_path,
        [
            {"prompt_id": "cap", "prompt": "Describe.", "image_id": None, "max_tokens": None},
            {"prompt_id": "q1", "prompt": "Colour?", "image_id": "a", "max_tokens": 16},
        ],
    )
    prompts = read_prompts_manifest(p)
    assert [(x.prompt_id, x.task, x.image_id, x.max_tokens) for x in prompts] == [
        ("cap", "caption", None, None),
        ("q1", "qa", "a", 16),
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "a", "prompt": "y"}],
            "duplicate prompt_id values 'a' in rows 0, 1",
        ),
        (
            [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": "  "}],
            r"column 'prompt' is null or empty in row 1",
        ),
        ([{"prompt_id": "a", "prompt": "x", "max_tokens": 0}], r"'max_tokens' must be at least 1; see row 0"),
        (
            [{"prompt_id": "a", "prompt": "x", "json_schema": "{not json"}],
            r"'json_schema' in row 0 \(prompt 'a'\) is not a valid JSON Schema",
        ),
        (
            [{"prompt_id": "a", "prompt": "x", "json_schema": '{"type": 5}'}],
            r"'json_schema' in row 0 \(prompt 'a'\) is not a valid JSON Schema",
        ),
        (
            [
                {"prompt_id": "a", "prompt": "x"},
                {"prompt_id": "b", "prompt": "y", "json_schema": '{"items": {"$ref": "#/$defs/tag"}}'},
            ],
            r"'json_schema' in row 1 \(prompt 'b'\) is not a valid JSON Schema: "
            r"\$ref '#/\$defs/tag' does not resolve inside the schema",
        ),
        (
            [{"prompt_id": "a", "prompt": "x", "json_schema": '{"$ref": "https://example.com/s.json"}'}],
            r"row 0 \(prompt 'a'\) .* \$ref 'https://example.com/s.json' is not a local JSON pointer",
        ),
        (
            [
                {
                    "prompt_id": "a",
                    "prompt": "x",
                    "tools": '[{"type": "function", "function": {"name": "f", "parameters": '
                    '{"properties": {"p": {"$ref": "#/definitions/p"}}}}}]',
                }
            ],
            r"column 'tools' in row 0 \(prompt 'a'\): tools\[0\]: the parameters of 'f' are not a valid "
            r"JSON Schema: \$ref '#/definitions/p' does not resolve inside the schema",
        ),
        ([{"prompt_id": None, "prompt": "x"}], r"'prompt_id' is null in row 0"),
    ],
)
def test_bad_prompts_manifests(tmp_path: Path, rows: list, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        read_prompts_manifest(prompts_manifest(tmp_path, rows))


def test_prompts_missing_column_and_wrong_type(tmp_path: Path) -> None:
    p = write_parquet(tmp_path / "p.parquet", {"prompt_id": ["a"], "text": ["x"]})
    with pytest.raises(ManifestError, match="missing column 'prompt'"):
        read_prompts_manifest(p)
    p = write_parquet(tmp_path / "p.parquet", {"prompt_id": ["a"], "prompt": ["x"], "max_tokens": ["ten"]})
    with pytest.raises(ManifestError, match="column 'max_tokens' has type string; expected integer"):
        read_prompts_manifest(p)


def test_prompts_naming_unknown_images(tmp_path: Path) -> None:
    images = read_images_manifest(images_manifest(tmp_path, {"a": ((4, 4), "red")}))
    p = prompts_manifest(
        tmp_path,
        [
            {"prompt_id": "1", "prompt": "x", "image_id": "a"},
            {"prompt_id": "2", "prompt": "x", "image_id": "zz"},
        ],
    )
    with pytest.raises(ManifestError, match=r"names images not in the images manifest \('zz'\) in row 1"):
        check_prompt_images(read_prompts_manifest(p), images, p)


def test_files_of_a_directory_manifest_may_differ_in_width_encoding_and_nullability(tmp_path: Path) -> None:
    """pandas 2 writes string, pandas 3 large_string, a category column is dictionary-encoded, and one
    writer marks a column non-nullable where another has nulls: all one manifest."""
    lbl = pa.schema([pa.field("image_id", pa.string()), pa.field("image", pa.string()),
                     pa.field("lbl", pa.string(), nullable=False)])  # fmt: skip
    write_parquet(
        tmp_path / "m" / "a.parquet", pa.table({"image_id": ["a"], "image": ["x.png"], "lbl": ["x"]}, lbl)
    )
    write_parquet(
        tmp_path / "m" / "b.parquet",
        {
            "image_id": pa.array(["b"]).dictionary_encode(),
            "image": pa.array(["y.png"]).dictionary_encode(),
            "lbl": pa.array([None], pa.large_string()),
        },
    )
    write_parquet(
        tmp_path / "m" / "c.parquet", {"image_id": ["c"], "image": ["z.png"], "lbl": [None]}
    )  # null
    m = read_images_manifest(tmp_path / "m", carry=["lbl"])
    assert m.carry_schema.field("lbl") == pa.field("lbl", pa.large_string(), nullable=True)
    batches = list(m.iter_batches(10))
    assert [b.schema.field("image").type for b in batches] == [pa.string()] * 3
    assert [b.column(2).to_pylist() for b in batches] == [["x"], [None], [None]]
    assert [b.column(2).type for b in batches] == [pa.large_string()] * 3
    write_parquet(tmp_path / "n" / "a.parquet", {"image_id": ["a"], "image": ["x.png"], "lbl": [1]})
    write_parquet(tmp_path / "n" / "b.parquet", {"image_id": ["b"], "image": ["y.png"], "lbl": ["1"]})
    with pytest.raises(
        ManifestError, match="--carry column 'lbl' has type string, but int64 in another file"
    ):
        read_images_manifest(tmp_path / "n", carry=["lbl"])


def test_prompt_files_of_other_widths_and_category_columns_read_as_one(tmp_path: Path) -> None:
    write_parquet(
        tmp_path / "p" / "a.parquet",
        {"prompt_id": ["p"], "prompt": ["x"], "max_tokens": pa.array([5], pa.int32()),
         "task": pa.array(["qa"]).dictionary_encode()},
    )  # fmt: skip
    write_parquet(
        tmp_path / "p" / "b.parquet",
        {"prompt_id": pa.array(["q"], pa.large_string()), "prompt": pa.array(["y"], pa.large_string()),
         "max_tokens": pa.array([7], pa.int64()), "task": pa.array(["caption"], pa.large_string())},
    )  # fmt: skip
    got = read_prompts_manifest(tmp_path / "p")
    assert [(p.prompt_id, p.prompt, p.max_tokens, p.task) for p in got] == [
        ("p", "x", 5, "qa"),
        ("q", "y", 7, "caption"),
    ]
    write_parquet(
        tmp_path / "u.parquet",
        {"prompt_id": ["p"], "prompt": ["x"], "max_tokens": pa.array([2**64 - 1], pa.uint64())},
    )
    with pytest.raises(ManifestError, match="column 'max_tokens'"):
        read_prompts_manifest(tmp_path / "u.parquet")
