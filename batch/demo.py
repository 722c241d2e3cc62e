"""The demo's sample data: product reviews, written as Parquet by ``batchinfer demo``.

Deterministic (seeded), so the demo and the tests see the same rows every time. Like real
data it holds a few rows that cannot be processed: a review with no text and one far longer
than the demo model's context. They land in ``_failed/`` with their reasons.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PRODUCTS = [
    ("kettle", "electric kettle"),
    ("headphones", "wireless headphones"),
    ("backpack", "hiking backpack"),
    ("blender", "countertop blender"),
    ("lamp", "desk lamp"),
    ("mouse", "wireless mouse"),
    ("jacket", "rain jacket"),
    ("pan", "non-stick frying pan"),
    ("charger", "USB-C charger"),
    ("bottle", "insulated water bottle"),
    ("keyboard", "mechanical keyboard"),
    ("tent", "two-person tent"),
]

POSITIVE = [
    "It arrived quickly and works exactly as described.",
    "The build quality is excellent and it feels solid.",
    "Battery life is far better than I expected.",
    "Setup took two minutes and it has worked every day since.",
    "Great value for the price, I would buy it again.",
    "My whole family uses it and nobody has complained.",
]
NEGATIVE = [
    "It stopped working after two weeks.",
    "The instructions were useless and support never replied.",
    "It is much smaller than the photos suggest.",
    "The plastic cracked the first time I used it.",
    "It makes a loud rattling noise that drives me mad.",
    "I returned it because it kept overheating.",
]
MIXED = [
    "It does the job, but the cable is too short.",
    "Good design, though the colour faded quickly.",
    "Works well most days, but occasionally needs a restart.",
]


def reviews_table(rows: int, seed: int = 7, start: int = 0) -> pa.Table:
    rng = random.Random(seed + start)
    data: dict[str, list[object]] = {
        k: [] for k in ("review_id", "product", "rating", "title", "body")
    }
    for i in range(start, start + rows):
        _, product = PRODUCTS[i % len(PRODUCTS)]
        mood = rng.choice(["pos", "pos", "neg", "mixed"])
        if mood == "pos":
            rating, sentences, title = rng.choice([4, 5]), POSITIVE, f"Love this {product}"
        elif mood == "neg":
            rating, sentences, title = (
                rng.choice([1, 2]),
                NEGATIVE,
                f"Disappointed with the {product}",
            )
        else:
            rating, sentences, title = 3, MIXED + POSITIVE[:2], f"Decent {product}"
        body: str | None = " ".join(rng.sample(sentences, k=2))
        if i == start + 5:
            body = None  # a review whose text was lost upstream
        elif i == start + 11:
            body = "This is a very long complaint. " * 500  # longer than the model's context
        data["review_id"].append(f"r{i:06d}")
        data["product"].append(product)
        data["rating"].append(rating)
        data["title"].append(title)
        data["body"].append(body)
    schema = pa.schema(
        [
            ("review_id", pa.string()),
            ("product", pa.string()),
            ("rating", pa.int8()),
            ("title", pa.string()),
            ("body", pa.string()),
        ]
    )
    return pa.table(data, schema=schema)


def write_reviews(folder: str | Path, rows: int = 96, files: int = 2) -> list[Path]:
    """Write ``rows`` reviews over ``files`` Parquet files (small row groups, like real dumps)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per_file = -(-rows // files)
    for f in range(files):
        start = f * per_file
        n = min(per_file, rows - start)
        if n <= 0:
            break
        path = folder / f"reviews-{f:04d}.parquet"
        pq.write_table(reviews_table(n, start=start), path, row_group_size=32)
        paths.append(path)
    return paths
