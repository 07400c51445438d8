"""A random-weight model with the exact shape of a served model, for GPU measurements without a hub.

    python -m bench.random_model TOKENIZER_DIR OUT_DIR [--shape qwen2.5-0.5b|qwen3-4b]

The device machine reaches no model hub, so the benchmarks there serve random weights of the real shape
(bf16, vocabulary 151,936, the tokenizer built by ``../shared/gpu/build_tokenizer.py``). The engine's work
per token is the real model's; the answers are noise and always run to their token budget.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from typing import Any

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # Qwen2.5-0.5B (the default model, YukinoStuki/Qwen2.5-0.5B-Plus-LLM)
    "qwen2.5-0.5b": ("Qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   use_sliding_window=False, sliding_window=32768, max_window_layers=21)),
    # Qwen3-4B (the qwen3-4b preset, YukinoStuki/Qwen3-4B-Plus-LLM)
    "qwen3-4b": ("Qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=40960, attention_bias=False, use_sliding_window=False,
                               sliding_window=None, max_window_layers=36)),
}


def build(tokenizer_dir: str, out: str, shape: str) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer

    family, dims = SHAPES[shape]
    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}ForCausalLM")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 151936, len(tok)
    kw: dict[str, Any] = dict(vocab_size=151936, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
                              attention_dropout=0.0, initializer_range=0.02,
                              bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **dims)
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    else:
        kw["rope_theta"] = 1000000.0
    cfg = config_class(**kw)
    cfg.dtype = torch.bfloat16
    started = time.time()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_class(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{shape}: {params / 1e9:.2f} B params, built and saved in {time.time() - started:.1f} s: {sorted(os.listdir(out))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    args = parser.parse_args()
    build(args.tokenizer_dir, args.out_dir, args.shape)


if __name__ == "__main__":
    main()
