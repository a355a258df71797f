"""Streamed text: the deltas add up to the final text, also when a stop string spans several tokens, and
nothing that the final text cuts is ever streamed (the start of a possible stop string is held back).
The built-in tokenizer gives every id of its model's vocabulary a text, so every sampled token shows.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from piggyback_runtime.engine import Engine
from piggyback_runtime.model import tokenizer as tokenizer_module
from piggyback_runtime.model.arch import SYNTHETIC_PRESETS
from piggyback_runtime.model.tokenizer import BUILTIN_SPECIAL_TOKENS, builtin_tokenizer
from piggyback_runtime.request import Request, SamplingParams
from tests.runtime.helpers import make_request, tiny_config

PROMPT = [1, *range(30, 40)]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = Engine(tiny_config())
    yield engine
    engine.close()


def _stream(engine: Engine, params: SamplingParams, rid: str) -> tuple[list[str], str, Request]:
    """Run one request; the text deltas as streamed, and the final text (all deltas, the last included)."""
    request = make_request(rid, PROMPT, params)
    engine.add_request(request)
    deltas: list[str] = []
    while engine.has_work():
        for output in engine.step():
            assert output.request_id == rid
            deltas.append(output.text_delta)
            # What has been streamed so far is always a prefix of what the request finally says.
            assert request.output_text.startswith("".join(deltas)), "streamed text the final output does not hold"
    return deltas, request.output_text, request


def _params(stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, stop=stop)


def _pieces(engine: Engine) -> tuple[list[str], str]:
    """Per-token text of the greedy continuation with no stop string, and the whole text."""
    deltas, text, request = _stream(engine, _params(), "plain")
    assert len(request.output_token_ids) == MAX_TOKENS and "".join(deltas) == text
    return deltas, text


def _window(pieces: list[str], text: str, tokens: int) -> tuple[int, str]:
    """A stop string spanning `tokens` tokens (last char of the first, all of the middle ones, first char of
    the last), whose start is the end of a token: the moment a stream without hold-back would leak it."""
    for k in range(1, len(pieces) - tokens):
        window = pieces[k : k + tokens]
        if all(p.isascii() and p.strip() for p in window):
            stop = window[0][-1] + "".join(window[1:-1]) + window[-1][0]
            if text.find(stop) == len("".join(pieces[:k])) + len(window[0]) - 1:  # its first occurrence
                return k, stop
    raise AssertionError(f"no {tokens}-token window of plain text in {pieces!r}")


@pytest.mark.parametrize("tokens", [2, 3])
def test_streamed_deltas_equal_the_final_text_with_a_stop_string_spanning_tokens(engine: Engine, tokens: int) -> None:
    pieces, text = _pieces(engine)
    k, stop = _window(pieces, text, tokens)
    deltas, final, request = _stream(engine, _params(stop=(stop,)), f"stop{tokens}")
    assert request.finish_reason == "stop"
    assert len(request.output_token_ids) == k + tokens, "the stop string completes on its last token"
    assert final == text[: text.find(stop)], "the final text is cut just before the stop string"
    assert "".join(deltas) == final
    # Token k ends with the stop string's first character: what streamed by then stops short of it.
    assert len("".join(deltas[: k + 1])) <= text.find(stop) < len("".join(pieces[: k + 1]))


def test_a_held_back_start_that_never_completes_a_stop_string_is_streamed_later(engine: Engine) -> None:
    pieces, text = _pieces(engine)
    k, stop = _window(pieces, text, 2)
    never = stop[0] + "\x00never"  # starts like a stop string, never completes
    deltas, final, request = _stream(engine, _params(stop=(never,)), "never")
    assert request.finish_reason == "length" and final == text and "".join(deltas) == text
    assert "".join(deltas[: k + 1]) != "".join(pieces[: k + 1]), "the possible stop-string start was held back"


def test_several_stop_strings_the_earliest_match_wins(engine: Engine) -> None:
    pieces, text = _pieces(engine)
    _, early = _window(pieces, text, 2)
    late = text[-3:]
    assert text.find(late) > text.find(early)
    deltas, final, _ = _stream(engine, _params(stop=(late, early)), "several")
    assert final == text[: text.find(early)] and "".join(deltas) == final


# --- the built-in tokenizer covers its model's vocabulary ------------------------------------------------
@pytest.mark.slow  # seconds: builds tokenizers of real vocabulary sizes
@pytest.mark.parametrize("vocab_size", [512, 2048, 32000])
def test_every_id_of_the_vocabulary_decodes_to_text(vocab_size: int) -> None:
    tokenizer = builtin_tokenizer(vocab_size)
    assert tokenizer.vocab_size == vocab_size
    specials = set(range(len(BUILTIN_SPECIAL_TOKENS)))
    empty = [i for i in range(vocab_size) if i not in specials and not tokenizer.decode([i])]
    assert not empty, f"{len(empty)} ids decode to nothing, e.g. {empty[:10]}"
    for i in specials:  # special tokens are skipped in output text, as OpenAI and vLLM do, but have a text
        assert tokenizer.decode([i], skip_special_tokens=False) == BUILTIN_SPECIAL_TOKENS[i]
    # Each id's text encodes to ids that decode to the same text.
    for i in range(len(specials), vocab_size, 7):
        piece = tokenizer.decode([i])
        assert tokenizer.decode(tokenizer.encode(piece, add_special_tokens=False)) == piece, i


@pytest.mark.slow  # seconds: builds tokenizers of real vocabulary sizes
def test_every_synthetic_preset_has_a_tokenizer_of_its_vocabulary_size() -> None:
    for name, arch in SYNTHETIC_PRESETS.items():
        assert builtin_tokenizer(arch.vocab_size).vocab_size == arch.vocab_size, name


TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. 100 + 1000 = 1100!",
    "unicode: héllo wörld — 你好, 🙂 and tabs\tand\nnewlines",
    "  leading and trailing spaces  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips_and_covering_the_vocabulary_does_not_change_encoding(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = builtin_tokenizer(2048)
    monkeypatch.setattr(tokenizer_module, "_cover_vocabulary", lambda backend, vocab_size: backend)
    trained_only = builtin_tokenizer(2048)  # the merges alone: the vocabulary the training text yields
    assert trained_only.vocab_size < full.vocab_size
    assert full.decode(full.encode(text)) == text
    # Prompts encode to the same ids as before the filler tokens existed (model outputs do not change).
    assert full.encode(text) == trained_only.encode(text)


def test_a_stream_of_tokens_beyond_the_trained_merges_shows_text_from_its_first_token() -> None:
    tokenizer = builtin_tokenizer(2048)
    request = Request("r", "chat", "LS", [1], SamplingParams(max_tokens=8, ignore_eos=True))  # type: ignore[arg-type]
    deltas = []
    for token in range(2000, 2008):  # far above the few hundred merges the training text yields
        request.append_token(token, tokenizer, {2}, 4096)
        deltas.append(request.take_text(final=False))
    assert all(deltas), f"every token streams text: {deltas!r}"
