"""The slice key of a work item (tasks/slice.py) and of a row of OUT.

A job's key is its image id, so that an image's prompts and chains stay together (the image is read
and prepared by one worker only); for a multi-image prompt its prompt id; for a text-only prompt the
prompt id of its chain's root. A row in OUT names its image and prompt; ``SliceKeys`` tells its key
from them and the job's prompts (which are multi-image, which text-only prompt roots which chain), so
a slice reads back into memory only the rows of its own part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from tasks.inputs.chains import group_by_root
from tasks.inputs.prompt import Prompt
from tasks.inputs.work_items import NO_IMAGE, ImageJob, ManyImages
from tasks.slice import Slice


class SliceKeys:
    """The slice key of a job (while running) and of a row (when reading OUT back)."""

    def __init__(self, text_prompts: Iterable[Prompt], multi_prompts: Iterable[Prompt]) -> None:
        self.root: dict[str, str] = {}  # a text-only prompt: its chain's root
        for chain in group_by_root(list(text_prompts)):
            for p in chain:
                self.root[p.prompt_id] = chain[0].prompt_id
        self.multi = frozenset(p.prompt_id for p in multi_prompts)

    @staticmethod
    def of_job(job: ImageJob) -> str:
        if job.value is NO_IMAGE:
            return job.prompts[0].prompt_id  # a text chain's root comes first
        if isinstance(job.value, ManyImages):
            return job.prompts[0].prompt_id
        return job.image_id or ""

    def of_row(self, image_id: str | None, prompt_id: str) -> str:
        if image_id is None:
            return self.root.get(prompt_id, prompt_id)
        if prompt_id in self.multi:
            return prompt_id
        return image_id

    def row_filter(self, part: Slice) -> Callable[[str | None, str], bool]:
        """Whether a row of OUT (image id, prompt id) is in ``part``."""
        return lambda image_id, prompt_id: part.holds(self.of_row(image_id, prompt_id))


def jobs_in(jobs: Iterator[ImageJob], part: Slice) -> Iterator[ImageJob]:
    """The jobs of ``part``, in order."""
    return (job for job in jobs if part.holds(SliceKeys.of_job(job)))
