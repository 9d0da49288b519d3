"""Tokenizer and chat template of a served checkpoint, loaded without remote code.

Checkpoints that ship a ``tokenizer.json`` (LLaDA, most modern models) load as a generic
fast tokenizer. Dream names a remote-code ``DreamTokenizer`` that is Qwen2's byte-level
BPE over ``vocab.json`` + ``merges.txt``, so it (and any Qwen2 tokenizer) loads as
``Qwen2TokenizerFast``. Anything else goes through ``AutoTokenizer``; remote code only
when the caller allows it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# End-of-turn markers of the chat formats in use (Llama 3 / LLaDA, ChatML / Qwen / Dream,
# Phi, Gemma). Only those present in a vocabulary count.
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
_QWEN_BPE_CLASSES = ("DreamTokenizer", "Qwen2Tokenizer", "Qwen2TokenizerFast")


class TokenizerError(Exception):
    """The tokenizer files cannot be loaded; the message says why."""


class Tokenizer:
    def __init__(
        self,
        backend: Any,
        *,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self._hf = backend
        self._vocab: dict[str, int] = dict(backend.get_vocab())
        self._template: str | None = chat_template or backend.chat_template
        eos = {int(i) for i in extra_eos_ids}
        if backend.eos_token_id is not None:
            eos.add(int(backend.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.eot_token_ids: frozenset[int] = frozenset(
            self._vocab[t] for t in _END_OF_TURN if t in self._vocab
        )
        self.stop_token_ids: frozenset[int] = self.eos_token_ids | self.eot_token_ids
        self.vocab_size: int = len(backend)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
        trust_remote_code: bool = False,
    ) -> Tokenizer:
        """Load the tokenizer in ``path``.

        ``chat_template`` overrides the checkpoint's template: a file path, or the Jinja
        text itself.
        """
        backend = _load_backend(Path(path), trust_remote_code)
        template = _read_template(chat_template) if chat_template else None
        return cls(backend, chat_template=template, extra_eos_ids=extra_eos_ids)

    def encode(self, text: str) -> list[int]:
        """Ids of a raw prompt, with the special tokens the tokenizer adds (as vLLM)."""
        return list(self._hf(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._hf.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of a chat prompt that ends where the assistant's answer starts."""
        if self._template is None:
            raise ValueError("this model has no chat template; start the server with one")
        text = self._hf.apply_chat_template(
            messages, chat_template=self._template, add_generation_prompt=True, tokenize=False
        )
        # The template writes any BOS itself, so the tokenizer must not add another.
        return list(self._hf(text, add_special_tokens=False)["input_ids"])

    def token_to_id(self, tok: str) -> int | None:
        return self._vocab.get(tok)


def _load_backend(path: Path, trust_remote_code: bool) -> Any:
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory {path} does not exist")
    cls_name = _tokenizer_class(path)
    try:
        if (path / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        if cls_name in _QWEN_BPE_CLASSES and (path / "vocab.json").is_file():
            # Looked up by name: transformers 5 exports it lazily, as an alias.
            qwen2_fast = getattr(transformers, "Qwen2TokenizerFast")  # noqa: B009
            return qwen2_fast.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise TokenizerError(
            f"cannot load the tokenizer in {path} (class {cls_name or 'unknown'}): {exc}"
        ) from exc


def _tokenizer_class(path: Path) -> str | None:
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    return value if isinstance(value, str) else None


def _read_template(template: str) -> str:
    # Jinja text is taken as the template itself (as vLLM does); anything else is a path.
    if "{{" in template or "{%" in template:
        return template
    candidate = Path(template)
    if not candidate.is_file():
        raise TokenizerError(f"chat template file {template} does not exist")
    return candidate.read_text(encoding="utf-8")
