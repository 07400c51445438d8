"""The offline demo model: a tiny deterministic Qwen2-architecture causal LM built locally.

Reserved id ``demo`` (``MODEL_ID=demo``).  The files are byte-identical on every build: weights come
from a fixed-seed generator, JSON is written with sorted keys, safetensors metadata is fixed.  The
tokenizer is byte-level BPE (256 byte tokens plus a fixed set of merges) with Qwen's special tokens
and chat template, so vLLM (CPU build) and transformers both load it.  Its answers are not meant to be
good; the path they travel is the real one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

DEMO_MODEL_ID = "demo"
log = logging.getLogger("download")

# Shape: head_dim = hidden / heads = 64 (the CPU attention kernels reject 16).
HIDDEN = 128
HEADS = 2
KV_HEADS = 1
LAYERS = 2
INTERMEDIATE = 256
VOCAB = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Files a complete demo snapshot has (the downloader's completeness check uses the same list).
DEMO_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenisation uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _tokenizer_json() -> dict:
    byte_chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab[byte_chars[b]] = len(vocab)
    # Fixed merges of ASCII pairs fill the vocabulary up to VOCAB, so every id the model can emit
    # decodes to text; deterministic by construction (a fixed order, no training).
    merges: list[str] = []
    alphabet = "etaoinshrdlcumwfgypbvkjxqz ETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,;:_()[]{}<>=+-*/#"
    pairs = ((a, b) for a in alphabet for b in alphabet)
    while len(vocab) < VOCAB - len(SPECIAL_TOKENS):
        a, b = next(pairs)
        left, right = byte_chars[ord(a)], byte_chars[ord(b)]
        merges.append(f"{left} {right}")
        vocab[left + right] = len(vocab)
    added = []
    for token in SPECIAL_TOKENS:
        vocab_id = len(vocab)
        vocab[token] = vocab_id
        added.append(
            {"id": vocab_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        )
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }


def _weights() -> dict:
    import torch

    gen = torch.Generator().manual_seed(1234)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * 0.02).contiguous()

    head_dim = HIDDEN // HEADS
    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(HIDDEN),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN),
            p + "self_attn.q_proj.weight": rand(HEADS * head_dim, HIDDEN),
            p + "self_attn.q_proj.bias": rand(HEADS * head_dim),
            p + "self_attn.k_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.bias": rand(KV_HEADS * head_dim),
            p + "self_attn.v_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.bias": rand(KV_HEADS * head_dim),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": rand(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": rand(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, INTERMEDIATE),
        })
    return tensors


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def is_complete(path: Path) -> bool:
    """True when every demo file is present (and non-empty)."""
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in DEMO_FILES)


def build_demo_model(path: Path) -> Path:
    """Write the demo model into ``path`` (created if needed); same bytes on every call."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer_json()
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "max_window_layers": LAYERS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "use_cache": True,
    }
    _write_json(path / "config.json", config)
    _write_json(
        path / "generation_config.json",
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
         "pad_token_id": ids["<|endoftext|>"], "do_sample": False},
    )
    _write_json(path / "tokenizer.json", tok)
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 4096,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "bos_token": None,
            "unk_token": None,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(
        path / "special_tokens_map.json",
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
    )
    save_file(_weights(), str(path / "model.safetensors"), metadata={"format": "pt"})
    log.info("[download] built the demo model in %s", path)
    return path
