"""Tokenizers behind one small interface: a built-in byte tokenizer and Hugging Face wrappers.

Interface (both classes): `encode(text) -> list[int]` (no special tokens added),
`decode(ids) -> str`, `vocab_size`, `pad_id`, `bos_id` (None when the tokenizer has none),
`eos_id`, and `apply_chat_template(messages, add_generation_prompt) -> list[int]`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

# Byte tokenizer layout: ids 0..255 are the raw UTF-8 bytes; the specials follow.
BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus specials 256.. (see BYTE_SPECIALS).

    vocab_size = 263: <pad>=256, <bos>=257, <eos>=258, then chat roles <|system|>=259,
    <|user|>=260, <|assistant|>=261 and <|end|>=262 (end of a chat turn). Needs no files, so
    the tiny default jobs run anywhere; it fits any model with vocab_size >= 263.
    """

    def __init__(self) -> None:
        self.special_ids = {name: 256 + i for i, name in enumerate(BYTE_SPECIALS)}
        self.vocab_size = 256 + len(BYTE_SPECIALS)
        self.pad_id = self.special_ids["<pad>"]
        self.bos_id: int | None = self.special_ids["<bos>"]
        self.eos_id = self.special_ids["<eos>"]

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ids (special-token strings are NOT parsed: they stay bytes)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD.

        Specials are dropped, or written by name when skip_special_tokens=False.
        """
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} out of range for ByteTokenizer (vocab {self.vocab_size})"
                )
            if not skip_special_tokens:
                out.append(buf.decode("utf-8", errors="replace"))
                out.append(BYTE_SPECIALS[i - 256])
                buf = bytearray()
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids for a chat: per turn `<|role|> content <|end|>`, then `<|assistant|>` if asked.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
        """
        ids: list[int] = []
        for m in messages:
            role = f"<|{m['role']}|>"
            if role not in self.special_ids:
                raise ValueError(f"unknown chat role {m['role']!r}; use system, user or assistant")
            ids += [self.special_ids[role], *self.encode(m["content"]), self.special_ids["<|end|>"]]
        if add_generation_prompt:
            ids.append(self.special_ids["<|assistant|>"])
        return ids

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A transformers tokenizer (loaded from a local directory) behind the small interface.

    pad_id falls back to eos_id when the tokenizer defines no pad token (common for LLMs);
    vocab_size is len(tokenizer) (base vocab plus added tokens).
    """

    def __init__(self, tokenizer) -> None:
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id: int = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} defines no eos token")
        self.bos_id: int | None = tokenizer.bos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id: int = self.eos_id if pad is None else pad

    def encode(self, text: str) -> list[int]:
        """Token ids for `text` without added special tokens (no bos/eos)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids of the tokenizer's own chat template applied to `messages`."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError(f"tokenizer {self.hf.name_or_path!r} has no chat template")
        text = self.hf.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return self.encode(text)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.hf.name_or_path!r}, vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """ "byte" -> ByteTokenizer; a local directory (HF checkpoint / tokenizer files) -> HFTokenizer.

    Raises FileNotFoundError when `spec` is neither "byte" nor an existing directory (no
    downloads: pass the folder of a checkpoint that is already on disk).
    """
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isdir(spec):
        raise FileNotFoundError(
            f"tokenizer {spec!r} is neither 'byte' nor an existing local directory "
            "(expected a folder with tokenizer.json / tokenizer_config.json)"
        )
    from transformers import AutoTokenizer  # lazy: heavy import

    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {spec!r}: {e}") from e
    return HFTokenizer(tok)
