"""Tokenizer and chat template: a Hugging Face tokenizer.json read with `tokenizers`, or one built in code.

The built-in tokenizer (for synthetic:// models) is a byte-level BPE trained at start-up on a fixed text,
so it is the same on every machine and round-trips any UTF-8 string; it covers its model's whole
vocabulary, so every token id a model can sample decodes to text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from piggyback_runtime.model.arch import ModelLoadError

BUILTIN_SPECIAL_TOKENS = (
    "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>",
)  # fmt: skip
BUILTIN_BOS_ID = 1
BUILTIN_EOS_ID = 2

# Llama-3-style template for the built-in tokenizer.
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_TRAINING_TEXT = """
Piggyback serves latency-sensitive and best-effort language model requests on one accelerator. The
scheduler decides, for every iteration, which requests run, how many prompt tokens are computed, and which
best-effort rows join the dense batch. A request arrives, waits in a queue, is prefilled in chunks and then
decodes one token at a time until it reaches a stop token, a stop string or its maximum length. The quick
brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation: , . ; : ! ? ( ) [ ]
{ } " ' - _ / \\ | @ # $ % ^ & * + = < > ~ and the words: hello world, assistant, user, system, question,
answer, summary, translate, explain, write, the, a, an, of, to, in, is, are, was, were, be, have, for, with.
"""


class Tokenizer:
    """Text <-> token ids, special-token ids, and the chat template."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        add_bos_token: bool,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._template = _JINJA.from_string(chat_template) if chat_template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        # Ids a model can produce but the tokenizer does not know (random weights, padded vocabularies)
        # decode to nothing rather than failing the request.
        known = [t for t in token_ids if 0 <= t < self.vocab_size]
        return self.backend.decode(known, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions with a plain prompt")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise ValueError(f"the chat template rejected these messages: {exc}") from None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


_JINJA = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
_JINJA.globals["raise_exception"] = _raise_exception
_JINJA.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)


def builtin_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of exactly `vocab_size` tokens: the merges the training text yields (at most 4096),
    then filler tokens up to the model's vocabulary size."""
    backend = HFTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096),
        special_tokens=list(BUILTIN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend = _cover_vocabulary(backend, vocab_size)
    return Tokenizer(
        backend,
        bos_token=BUILTIN_SPECIAL_TOKENS[BUILTIN_BOS_ID],
        eos_token=BUILTIN_SPECIAL_TOKENS[BUILTIN_EOS_ID],
        chat_template=BUILTIN_CHAT_TEMPLATE,
        add_bos_token=True,
    )


_CONSONANTS = "bcdfghjklmnprstvwxz"
_VOWELS = "aeiou"


def _filler_word(index: int) -> str:
    """The index-th pseudo-word (" ba", " be", ..., " zu", " baba", ...) in the byte-level alphabet ("Ġ" is a
    space), so every filler token decodes to visible ASCII text."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    word = ""
    index += 1  # bijective base-len(syllables): every index gets a distinct, non-empty word
    while index > 0:
        index, digit = divmod(index - 1, len(syllables))
        word = syllables[digit] + word
    return "\u0120" + word


def _cover_vocabulary(backend: HFTokenizer, vocab_size: int) -> HFTokenizer:
    """Give every id in [0, vocab_size) a token. The training text yields only a few hundred merges, but a
    synthetic model samples from its whole vocabulary; an id the tokenizer does not know decodes to nothing,
    so a stream of such ids shows the client no text at all. The filler tokens have no merges leading to
    them: encoding (and so every prompt's token ids) is unchanged, decoding gives each a pseudo-word."""
    spec = json.loads(backend.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if len(vocab) >= vocab_size:
        return backend
    next_id, index = len(vocab), 0
    while next_id < vocab_size:
        word = _filler_word(index)
        index += 1
        if word not in vocab:  # a trained token may already spell it
            vocab[word] = next_id
            next_id += 1
    return HFTokenizer.from_str(json.dumps(spec))


def _token_text(entry: Any) -> str | None:
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


def load_hf_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json for special tokens and the chat template) from a model folder."""
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.exists():
        raise ModelLoadError(
            f"{folder}: no tokenizer.json (only fast tokenizers are supported; save one with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        )
    backend = HFTokenizer.from_file(str(tokenizer_file))
    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
    chat_template = config.get("chat_template")
    template_file = folder / "chat_template.jinja"
    if chat_template is None and template_file.exists():
        chat_template = template_file.read_text()
    if isinstance(chat_template, list):  # several named templates: take the default one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    bos = _token_text(config.get("bos_token"))
    # Many tokenizer.json files add BOS in their post-processor; add_bos_token covers those that don't.
    post_adds_bos = bool(bos) and backend.encode("", add_special_tokens=True).ids[:1] == [backend.token_to_id(bos)]
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=_token_text(config.get("eos_token")),
        chat_template=chat_template,
        add_bos_token=bool(config.get("add_bos_token", post_adds_bos)),
    )
