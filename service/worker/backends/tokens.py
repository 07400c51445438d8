"""Tokenizer helpers shared by the engine, the answering pipeline and the benchmark (no engine import)."""

from __future__ import annotations

from typing import Any


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's end-of-turn tokens (Qwen's ``<|im_end|>`` and ``<|endoftext|>``) and its EOS."""
    ids: set[int] = set()
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        if token in vocab:
            ids.add(vocab[token])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of many prompts in one call; the fast tokenizer spreads it over the cores.

    The Rust tokenizer's ``encode_batch_fast`` gives the ids that ``tokenizer(prompts)`` gives, without the
    offsets, masks and per-prompt Python dicts that call builds (25 ms instead of 43 ms for 1,229 prompts on
    the CPU). Used only when the Rust tokenizer truncates and pads nothing, as ``tokenizer(prompts)`` does.
    """
    rust = getattr(tokenizer, "_tokenizer", None)
    if rust is not None and rust.truncation is None and rust.padding is None:
        batch = getattr(rust, "encode_batch_fast", None) or rust.encode_batch  # _fast: tokenizers >= 0.21
        return [encoding.ids for encoding in batch(prompts, add_special_tokens=False)]
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def decode_answers(tokenizer: Any, token_ids: list[Any]) -> list[str]:
    """Answers generated with ``detokenize=False``, decoded in one batch call as vLLM's detokenizer would.

    vLLM's incremental detokenizer skips special tokens and holds back an incomplete UTF-8 character
    at the end (an answer cut off by its token budget); the one-shot decode would show that as U+FFFD.
    """
    if not token_ids:
        return []
    lists = [list(ids) for ids in token_ids]
    rust = getattr(tokenizer, "_tokenizer", None)  # the fast tokenizer's own (what vLLM's detokenizer steps)
    if rust is not None and hasattr(rust, "decode_batch"):
        texts = rust.decode_batch(lists, skip_special_tokens=True)
    else:
        texts = tokenizer.batch_decode(lists, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return [text.rstrip("\ufffd") for text in texts]
