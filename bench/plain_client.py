"""The obvious alternative a user would write: asyncio + openai, a Semaphore, gather, Parquet at the end.

    .venv/bin/python bench/plain_client.py IMAGES PROMPTS OUT.parquet --base-url URL --concurrency C

``AsyncOpenAI`` with its default settings (httpx transport, its own retries), one request per image ×
prompt with the image as a base64 data URL, all results kept in memory and written once. Prints one
JSON line: ``{"elapsed_s": ..., "ok": ..., "failed": ...}`` (manifest read → Parquet written).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from openai import AsyncOpenAI


async def main(args: argparse.Namespace) -> dict[str, float]:
    started = time.perf_counter()
    images = pq.read_table(args.images).to_pylist()
    prompts = pq.read_table(args.prompts).to_pylist()
    root = Path(args.images).parent
    client = AsyncOpenAI(base_url=args.base_url, api_key="none")
    semaphore = asyncio.Semaphore(args.concurrency)

    async def one(image: dict, prompt: dict) -> dict:
        async with semaphore:
            data = base64.b64encode((root / image["image"]).read_bytes()).decode()
            try:
                response = await client.chat.completions.create(
                    model=args.model,
                    max_tokens=1024,
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}},
                                {"type": "text", "text": prompt["prompt"]},
                            ],
                        }
                    ],
                )
                text, error = response.choices[0].message.content, None
            except Exception as exc:
                text, error = None, repr(exc)
            return {
                "image_id": image["image_id"],
                "prompt_id": prompt["prompt_id"],
                "text": text,
                "error": error,
            }

    rows = await asyncio.gather(*(one(image, prompt) for image in images for prompt in prompts))
    pq.write_table(pa.Table.from_pylist(rows), args.out)
    await client.close()
    failed = sum(row["error"] is not None for row in rows)
    return {"elapsed_s": time.perf_counter() - started, "ok": len(rows) - failed, "failed": failed}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--model", default="google/gemma-4-31b-it")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
