"""The obvious alternative a user would write: asyncio + openai, a Semaphore, gather, Parquet at the end.

    .venv/bin/python bench/plain_client.py IMAGES PROMPTS OUT.parquet --base-url URL --concurrency C
    .venv/bin/python bench/plain_client.py ... --minimal

``AsyncOpenAI`` with its default settings (httpx transport, its own retries), one request per image ×
prompt with the image as a base64 data URL, all results kept in memory and written once. Prints one
JSON line: ``{"elapsed_s": ..., "ok": ..., "failed": ...}`` (manifest read → Parquet written).

``--minimal`` is no alternative but a yardstick: every request body is built (image read, base64,
JSON) *before* the clock starts, then C coroutines post them on one ``aiohttp.ClientSession`` and only
parse the answers. No SDK, no retries, no image preparation, no rows kept but the text: about the least
work per request a Python client can do, so its figure is about the most this machine and emulator
allow any client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path

import aiohttp
import orjson
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


async def minimal(args: argparse.Namespace) -> dict[str, float]:
    """The yardstick: bodies built first, then only posted and their answers parsed (see the top)."""
    images = pq.read_table(args.images).to_pylist()
    prompts = pq.read_table(args.prompts).to_pylist()
    root = Path(args.images).parent
    bodies = []
    for image in images:
        url = "data:image/jpeg;base64," + base64.b64encode((root / image["image"]).read_bytes()).decode()
        for prompt in prompts:
            content = [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": prompt["prompt"]},
            ]
            messages = [{"role": "user", "content": content}]
            bodies.append(orjson.dumps({"model": args.model, "max_tokens": 1024, "messages": messages}))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))
    url = args.base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    texts: list[str | None] = [None] * len(bodies)
    started = time.perf_counter()
    todo = iter(enumerate(bodies))

    async def worker() -> None:
        for index, body in todo:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    answer = orjson.loads(await response.read())
                texts[index] = answer["choices"][0]["message"]["content"]
            except Exception:  # counted as failed below (its text stays None)
                pass

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    pq.write_table(pa.table({"text": texts}), args.out)
    elapsed = time.perf_counter() - started
    await session.close()
    failed = sum(text is None for text in texts)
    return {"elapsed_s": elapsed, "ok": len(texts) - failed, "failed": failed}


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
    parser.add_argument(
        "--minimal", action="store_true", help="the yardstick: bodies built first, bare aiohttp"
    )
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(minimal(arguments) if arguments.minimal else main(arguments))))
