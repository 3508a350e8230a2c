"""Tokenizer from a checkpoint directory: ``tokenizer.json`` through the ``tokenizers`` library.

* ``tokenizer_config.json`` gives the special tokens (``bos_token``, ``eos_token``), ``add_bos_token`` and
  the ``chat_template`` (a Jinja template, rendered with ``jinja2`` when it is installed; a chat request
  without jinja2 is a clear error).
* BOS: ``encode`` runs the tokenizer's post-processor (which adds BOS for Llama-style tokenizers); if the
  config says ``add_bos_token: true`` and the post-processor did not add it, BOS is prepended; a chat
  template's text already carries its BOS, so it is encoded without special tokens (as HF and vLLM do).
* Incremental detokenization (:class:`IncrementalDetokenizer`) keeps vLLM's prefix/read offsets so
  multi-byte characters split over tokens appear only once complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _token_text(tok: Any) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):  # AddedToken serialized as {"content": ...}
        return tok.get("content")
    return str(tok)


class Tokenizer:
    """A checkpoint's tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {path}: the runtime reads fast-tokenizer files only; pass token ids "
                "instead of text, or save the tokenizer with tokenizers/transformers (save_pretrained)"
            )
        self._tok = _HFTokenizer.from_file(str(file))
        cfg_file = file.parent / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.chat_template = self.config.get("chat_template")
        if self.chat_template is None and (file.parent / "chat_template.jinja").is_file():
            self.chat_template = (file.parent / "chat_template.jinja").read_text()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, _ in self._added_special()}

    def _added_special(self) -> list[tuple[int, Any]]:
        decoder = getattr(self._tok, "get_added_tokens_decoder", None)
        if decoder is None:
            return []
        return [(i, t) for i, t in decoder().items() if getattr(t, "special", False)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's chat template."""
        if not self.chat_template:
            raise ValueError("this model ships no chat_template (tokenizer_config.json); pass a plain prompt")
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise RuntimeError("chat templates need jinja2: pip install jinja2 (or pass a plain prompt)") from exc

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters.setdefault("tojson", lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False))
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one step at a time (vLLM's offset algorithm).

    ``prefix_offset:read_offset`` is a window of already-emitted tokens decoded again for context (so
    tokenizers that strip a leading space or merge bytes see their neighbours); text ending in U+FFFD (an
    incomplete UTF-8 sequence) is held back until the next token completes it.
    """

    _CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-self._CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def step(self, token_id: int) -> str:
        """Append one token; returns the new text (possibly empty) and adds it to :attr:`text`."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            # keep the window short: drop ids before prefix_offset
            if self.prefix_offset > 64:
                drop = self.prefix_offset
                self.ids = self.ids[drop:]
                self.prefix_offset -= drop
                self.read_offset -= drop
            self.text += new
            return new
        return ""
