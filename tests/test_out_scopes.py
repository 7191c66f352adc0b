"""Writers of several scopes (slices) of a local OUT changing one older file at once: the gate
(tasks/outputs/lock.py, ``out_gate``), which the store holds for such rewrites, keeps every change.
The locks and clean-up of scopes are tested in tests/test_slices_e2e.py."""

from __future__ import annotations

from pathlib import Path

from tasks.outputs.layout import prepare_out_dir
from tasks.outputs.lock import out_gate


def test_rows_removed_from_one_local_file_by_writers_at_once_all_stay_removed(tmp_path: Path) -> None:
    """Writers of several scopes removing their rows from one older file at the same moment: each
    read-modify-replace holds OUT's gate (as ``OutputStore`` does for a slice), so none brings back
    another's row."""
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
        with out_gate(out):
            remove_rows(out / "part-000000-old.parquet", {identity_hash(image_id, "cap")}, "slice-1-of-2")

    threads = [threading.Thread(target=remove, args=(i,)) for i in ids[:8]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(read_output(out, ["image_id"])["image_id"].to_pylist()) == {"img8"}
