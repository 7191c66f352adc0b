from pathlib import Path

from tasks.inputs.manifests import read_images_manifest
from tasks.inputs.prompt import DEFAULT_PROMPT, Prompt
from tasks.inputs.work_items import PromptPlan, item_id, iter_image_jobs, iter_shards, limit_items
from tests.builders import write_parquet

CAP = Prompt("cap", "Describe.", "caption")
Q_B = Prompt("qb", "Colour?", "qa", image_id="b")


def manifest(tmp_path: Path, n: int):
    ids = [f"i{k}" for k in range(n)]
    return read_images_manifest(
        write_parquet(tmp_path / "m.parquet", {"image_id": ids, "image": [f"{i}.jpg" for i in ids]})
    )


def test_work_items_follow_the_contract(tmp_path: Path) -> None:
    m = read_images_manifest(
        write_parquet(tmp_path / "m.parquet", {"image_id": ["a", "b"], "image": ["1", "2"]})
    )
    plan = PromptPlan.build([CAP, Q_B])
    jobs = list(iter_image_jobs(m, plan))
    assert [(j.image_id, [p.prompt_id for p in j.prompts]) for j in jobs] == [
        ("a", ["cap"]),
        ("b", ["cap", "qb"]),
    ]
    assert plan.count_items(2) == 3
    assert PromptPlan.build(None).for_all == (DEFAULT_PROMPT,)


def test_images_without_prompts_produce_no_work(tmp_path: Path) -> None:
    m = read_images_manifest(
        write_parquet(tmp_path / "m.parquet", {"image_id": ["a", "b"], "image": ["1", "2"]})
    )
    jobs = list(iter_image_jobs(m, PromptPlan.build([Q_B])))
    assert [j.image_id for j in jobs] == ["b"]


def test_limit_counts_work_items_not_images(tmp_path: Path) -> None:
    m = manifest(tmp_path, 10)
    plan = PromptPlan.build([CAP, Prompt("p2", "Other?", "qa")])
    jobs = list(limit_items(iter_image_jobs(m, plan), 5))
    assert sum(len(j.prompts) for j in jobs) == 5
    assert [len(j.prompts) for j in jobs] == [2, 2, 1]


def test_shards_keep_an_image_together_and_respect_the_size(tmp_path: Path) -> None:
    m = manifest(tmp_path, 1000)
    plan = PromptPlan.build([CAP, Prompt("p2", "Other?", "qa"), Prompt("p3", "More?", "qa")])
    shards = list(iter_shards(iter_image_jobs(m, plan), shard_size=100))
    assert [s.index for s in shards] == list(range(len(shards)))
    assert all(s.num_items <= 100 for s in shards)
    assert sum(s.num_items for s in shards) == 3000
    seen = [j.image_id for s in shards for j in s.jobs]
    assert seen == [f"i{k}" for k in range(1000)]  # manifest order, each image once


def test_item_id_is_stable_and_distinct() -> None:
    assert item_id("a", "b") == item_id("a", "b")
    assert item_id("a", "bc") != item_id("ab", "c")
    assert len(item_id("a", "b")) == 24
