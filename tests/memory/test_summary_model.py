"""Summaries on a configured model of their own (CORRAL_MEMORY_SUMMARY_MODEL): the chat step
answers and enqueues a summarise workflow on that model's pool, which folds the turns.

Its own platform on a private Redis: a chat pool, a pool for the summarising model (a second
catalog entry over the tiny chat weights) and the embedding pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from app.core.config import Settings
from app.core.embedded import EmbeddedRedis
from models.catalog import CATALOG_PATH
from tests.memory.test_memory_api import N_CTX, create, long_history, say
from tests.utils.platform import Platform, start_platform

pytestmark = pytest.mark.e2e

SUMMARIZER = "tiny-summarizer"


@pytest.fixture
def summary_platform(settings: Settings, tmp_path: Path) -> Iterator[Platform]:
    catalog = yaml.safe_load(CATALOG_PATH.read_text())
    chat = next(m for m in catalog["models"] if m["name"] == "tiny-chat")
    catalog["models"].append({**chat, "name": SUMMARIZER, "description": "summaries"})
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    server = EmbeddedRedis(tmp_path / "redis").start()
    isolated = settings.model_copy(
        update={
            "redis_url": server.url,
            "catalog_path": path,
            "memory_summary_model": SUMMARIZER,
        }
    )
    try:
        plat = start_platform(
            isolated, tmp_path, workers={"tiny-chat": 1, SUMMARIZER: 1, "tiny-embed": 1}
        )
        try:
            yield plat
        finally:
            plat.stop()
    finally:
        server.stop()


def test_overflow_is_summarised_by_the_configured_model(summary_platform: Platform) -> None:
    c = summary_platform.client
    conv = create(c, "summary-user")
    long_history(c, conv["id"], seed=11)
    out = say(c, conv["id"], "sum it up", respond={"max_tokens": 32, "temperature": 0})
    assert out["status"] == "succeeded", out
    memory = out["output"]["memory"]
    # The chat model answered with what fits and handed the folding to the summarizer.
    report = memory["summary"]
    assert report["action"] == "enqueued" and report["model"] == SUMMARIZER, report
    for rnd in memory["rounds"]:
        assert rnd["prompt_tokens"] + 32 <= N_CTX
    run = summary_platform.wait(report["workflow_id"], timeout_s=120)
    assert run["status"] == "succeeded", run
    (step,) = run["steps"]
    assert step["model"] == SUMMARIZER
    assert step["output"]["memory"]["task"] == "summarise"
    assert step["output"]["model"] == SUMMARIZER
    stored = c.get(f"/v1/conversations/{conv['id']}").json()
    assert stored["summary"] and stored["summary_model"] == SUMMARIZER
    assert stored["summary_upto"] == report["upto"]
    # The next reply reads the summary the other model wrote.
    again = say(c, conv["id"], "and now?", respond={"max_tokens": 8, "temperature": 0})
    assert again["status"] == "succeeded", again
    assert again["output"]["memory"]["tokens"]["summary"] > 0
