"""Whether a draft model's tokenizer matches the main model's (draft-model speculative decoding needs it)."""

from __future__ import annotations

import json
from pathlib import Path


def _vocabulary(path: Path) -> dict[str, int] | None:
    """Token -> id from tokenizer.json, or vocab.json (+ added tokens); None when neither is readable."""
    try:
        if (path / "tokenizer.json").is_file():
            data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                result = {str(k): int(v) for k, v in vocab.items()}
            elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                result = {str(entry[0]): i for i, entry in enumerate(vocab)}
            else:
                result = {}
            result.update({t["content"]: int(t["id"]) for t in data.get("added_tokens") or []})
            return result
        if (path / "vocab.json").is_file():
            result = {str(k): int(v) for k, v in json.loads((path / "vocab.json").read_text(encoding="utf-8")).items()}
            if (path / "added_tokens.json").is_file():
                added = json.loads((path / "added_tokens.json").read_text(encoding="utf-8"))
                result.update({str(k): int(v) for k, v in added.items()})
            return result
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None
    return None


def _raw_tokenizer(path: Path) -> bytes | None:
    for name in ("tokenizer.model", "vocab.txt", "tokenizer.tiktoken"):
        if (path / name).is_file():
            return (path / name).read_bytes()
    return None


def check_draft_tokenizer(main_dir: Path, draft_dir: Path) -> str | None:
    """A one-paragraph message when the draft model's tokenizer differs from the main model's, else None.

    Compares the vocabularies (tokenizer.json, or vocab.json) token by token; failing those, the raw
    tokenizer files (tokenizer.model, vocab.txt).  A draft without tokenizer files (EAGLE heads use
    the target's) is not reported.
    """
    main, draft = _vocabulary(main_dir), _vocabulary(draft_dir)
    if main is not None and draft is not None:
        if main == draft:
            return None
        differing = sorted(t for t in main.keys() | draft.keys() if main.get(t) != draft.get(t))
        return (f"The draft model's tokenizer ({draft_dir}) differs from the main model's ({main_dir}): "
                f"{len(draft)} vs {len(main)} tokens, {len(differing)} missing or with other ids "
                f"(e.g. {differing[0]!r}). Draft-model speculative decoding needs the same vocabulary: choose a "
                "draft from the main model's family (SPEC_DRAFT_MODEL_ID) or use SPEC_METHOD=ngram.")
    main_raw, draft_raw = _raw_tokenizer(main_dir), _raw_tokenizer(draft_dir)
    if main_raw is not None and draft_raw is not None and main_raw != draft_raw:
        return (f"The draft model's tokenizer files ({draft_dir}) differ from the main model's ({main_dir}). "
                "Draft-model speculative decoding needs the same vocabulary: choose a draft from the main "
                "model's family (SPEC_DRAFT_MODEL_ID) or use SPEC_METHOD=ngram.")
    return None
