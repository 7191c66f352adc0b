"""Writer scopes of a local OUT: a lock per scope, the whole-OUT writer and a scope's writer excluding
each other, and a starting writer deleting only its own scope's temporaries (tasks/outputs/layout.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.errors import UsageError
from tasks.outputs.layout import OUT_SCOPE, STATE_DIR, prepare_out_dir, remove_temporaries
from tasks.outputs.lock import OutLock, writer_of


def test_scopes_lock_side_by_side_and_exclude_the_whole_out_writer(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "out")
    assert isinstance(out, Path)
    one, two = OutLock(out, "s1", scope="slice-1-of-2"), OutLock(out, "s2", scope="slice-2-of-2")
    one.acquire()
    two.acquire()
    assert (out / STATE_DIR / "lock-slice-1-of-2").is_file()
    with pytest.raises(UsageError, match="is being written by run s"):
        OutLock(out, "whole").acquire()
    with pytest.raises(UsageError, match="is being written by run s1"):
        OutLock(out, "again", scope="slice-1-of-2").acquire()
    who = writer_of(out)
    assert who is not None and "run s1" in who and "run s2" in who
    one.release()
    two.release()
    whole = OutLock(out, "whole", scope=OUT_SCOPE)
    whole.acquire()
    with pytest.raises(UsageError, match="is being written by run whole"):
        OutLock(out, "s1", scope="slice-1-of-2").acquire()
    whole.release()
    with pytest.raises(UsageError, match="writer scope"):
        OutLock(out, "x", scope="../up")


def test_a_starting_writer_deletes_only_its_own_scopes_temporaries(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "out")
    assert isinstance(out, Path)
    names = [".tmp-abc-part-1.parquet", ".tmp.slice-1-of-2-abc-part-2.parquet", ".tmp.slice-2-of-2-abc-x"]
    for name in names:
        (out / name).write_bytes(b"")
    assert remove_temporaries(out, "slice-1-of-2") == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp")) == [names[0], names[2]]
    assert remove_temporaries(out) == 1  # the whole-OUT writer: its own, as always
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp")] == [names[2]]


def test_rows_removed_from_one_local_file_by_writers_at_once_all_stay_removed(tmp_path: Path) -> None:
    """Writers of several scopes removing their rows from one older file at the same moment: each
    read-modify-replace holds ``_vlmbatch/rewrite.lock``, so none brings back another's row."""
    import threading

    from tasks.outputs.index import identity_hash
    from tasks.outputs.layout import write_atomic
    from tasks.outputs.reading import read_output
    from tasks.outputs.store import remove_rows
    from tasks.outputs.table import rows_to_table
    from tasks.row import OUTPUT_SCHEMA
    from tests.test_outputs import row

    out = prepare_out_dir(tmp_path / "out")
    assert isinstance(out, Path)
    ids = [f"img{k}" for k in range(9)]
    write_atomic(rows_to_table([row(i) for i in ids * 300], OUTPUT_SCHEMA), out / "part-000000-old.parquet")
    gate = threading.Barrier(8)

    def remove(image_id: str) -> None:
        gate.wait()
        remove_rows(out / "part-000000-old.parquet", {identity_hash(image_id, "cap")}, f"s-{image_id}")

    threads = [threading.Thread(target=remove, args=(i,)) for i in ids[:8]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(read_output(out, ["image_id"])["image_id"].to_pylist()) == {"img8"}
