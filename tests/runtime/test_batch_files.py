"""Batch input files line by line, and the `batch` config section: every refusal names the line or field."""

from __future__ import annotations

import json

import pytest

from piggyback_runtime.batch.files import LineError, parse_file
from piggyback_runtime.config import ConfigError, RuntimeConfig
from tests.runtime.batch_helpers import batch_config, chat_line, jsonl

CONFIG = batch_config(8000, {"directory": "/unused"})


def refusal(content: bytes, endpoint: str | None = None) -> LineError:
    with pytest.raises(LineError) as caught:
        parse_file(content, CONFIG, max_lines=100, endpoint=endpoint)
    return caught.value


def test_a_good_file_parses_to_one_entry_per_line() -> None:
    parsed = parse_file(jsonl([chat_line("a"), chat_line("b", model="bulk2")]), CONFIG, max_lines=100)
    assert [(custom_id, model) for custom_id, model, _ in parsed] == [("a", "bulk"), ("b", "bulk2")]
    assert json.loads(parsed[0][2])["messages"][0]["content"] == "say a"


@pytest.mark.parametrize(("lines", "line", "param", "words"), [
    ([chat_line("a"), "not json"], 2, None, "not valid JSON"),
    ([chat_line("a"), [1, 2]], 2, None, "JSON object"),
    ([{**chat_line("a"), "extra": 1}], 1, "extra", "unknown field"),
    ([{**chat_line("a"), "custom_id": ""}], 1, "custom_id", "non-empty"),
    ([{**chat_line("a"), "method": "GET"}], 1, "method", "POST"),
    ([{**chat_line("a"), "url": "/v1/embeddings"}], 1, "url", "not supported"),
    ([chat_line("a", stream=True)], 1, "body.stream", "stream must be false"),
    ([chat_line("a", top_p=0)], 1, "body.top_p", "greater than 0"),
    ([chat_line("a"), chat_line("a")], 2, "custom_id", "repeats line 1"),
    ([chat_line("a", model="chat")], 1, "body.model", "LS"),
    ([chat_line("a", model="nope")], 1, "body.model", "does not exist"),
])  # fmt: skip
def test_each_bad_line_is_named_with_its_field(lines: list, line: int, param: str | None, words: str) -> None:
    content = b"".join((item if isinstance(item, str) else json.dumps(item)).encode() + b"\n" for item in lines)
    error = refusal(content)
    assert (error.line, error.param) == (line, param) and words in str(error) and f"line {line}" in str(error)


def test_empty_files_too_many_lines_and_a_foreign_endpoint_are_refused() -> None:
    assert "empty" in str(refusal(b""))
    with pytest.raises(LineError, match="above the limit of 2"):
        parse_file(jsonl([chat_line(str(i)) for i in range(3)]), CONFIG, max_lines=2)
    error = refusal(jsonl([chat_line("a")]), endpoint="/v1/completions")
    assert error.code == "mismatched_endpoint" and error.param == "url"


def test_the_batch_config_needs_somewhere_to_keep_state() -> None:
    base = CONFIG.model_dump(mode="json", by_alias=True, exclude_none=True)
    with pytest.raises(ConfigError, match=r"batch: Value error, batch\.enabled needs batch\.directory"):
        RuntimeConfig.from_dict({**base, "batch": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"batch\.database_url: .*postgresql\+asyncpg://"):
        RuntimeConfig.from_dict({**base, "batch": {"enabled": True, "database_url": "mysql://x"}})
    shared = RuntimeConfig.from_dict({**base, "batch": {"enabled": True, "database_url_env": "DB_URL"}})
    assert shared.batch.directory is None
