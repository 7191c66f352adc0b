"""Regenerate the demo manifests: `python data/demo/make_manifests.py`."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent

IMAGES = [
    ("cat", "images/chelsea-cat.jpg", "Chelsea the cat"),
    ("coffee", "images/coffee-cup.jpg", "A coffee cup"),
    ("falcon9", "images/falcon9-launch.jpg", "Falcon 9 launching DSCOVR"),
    ("retina", "images/retina.jpg", "Fundus photograph of a normal left eye"),
]

PROMPTS = [
    # (prompt_id, prompt, task, image_id, system)
    (
        "caption",
        "Describe this image in one or two sentences.",
        "caption",
        None,
        "You write concise, factual image captions for a dataset.",
    ),
    ("cat-colour", "What colour is the cat's fur?", "qa", "cat", None),
    ("falcon9-phase", "Is the rocket on the pad or already in flight?", "qa", "falcon9", None),
    ("retina-eye", "Is this a left or a right eye? Answer in one word.", "qa", "retina", None),
]

if __name__ == "__main__":
    pq.write_table(
        pa.table(
            {
                "image_id": [i for i, _, _ in IMAGES],
                "image": [p for _, p, _ in IMAGES],
                "title": [t for _, _, t in IMAGES],
            }
        ),
        HERE / "images.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "prompt_id": [p[0] for p in PROMPTS],
                "prompt": [p[1] for p in PROMPTS],
                "task": [p[2] for p in PROMPTS],
                "image_id": pa.array([p[3] for p in PROMPTS], type=pa.string()),
                "system": pa.array([p[4] for p in PROMPTS], type=pa.string()),
            }
        ),
        HERE / "prompts.parquet",
    )
