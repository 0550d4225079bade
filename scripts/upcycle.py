"""A mixture-of-experts model built from a dense Llama-family one, for benchmarks: no MoE checkpoint is offline.

    python scripts/upcycle.py [--model smollm2-135m] [--experts 8] [--top-k 2] [--seed 0] [--out DIR]

Every decoder layer's MLP becomes ``experts`` copies of itself behind a router of fixed random weights
(normal, std 1, seed ``--seed``) choosing ``top-k`` of them per token, in Mixtral's layout (transformers'
``MixtralForCausalLM``; its routing weights are renormalized over the chosen experts). Attention, norms,
embeddings and head are the dense model's. With identical experts every token's MLP output is the dense one
(the renormalized weights sum to 1), so the model gives the dense model's logits, up to rounding; compressing
it compresses each expert on the tokens routed to it, so the experts drift apart. Written once (config,
weights, tokenizer) into ``~/.cache/compressor/models/<model>-moe<experts>x<top-k>`` (or ``--out``); the path
is printed, and ``compressor compress PATH ...`` reads it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def upcycle(dense: nn.Module, experts: int = 8, top_k: int = 2, seed: int = 0) -> nn.Module:
    """A ``MixtralForCausalLM`` whose layers hold ``experts`` copies of ``dense``'s MLP (gate/up/down, no
    biases) behind a fixed random router; everything else is ``dense``'s."""
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.initialization import no_init_weights

    source = dense.config
    config = MixtralConfig(
        vocab_size=source.vocab_size, hidden_size=source.hidden_size, intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads, head_dim=getattr(source, "head_dim", None),
        hidden_act=source.hidden_act, max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps, rope_parameters=getattr(source, "rope_parameters", None),
        tie_word_embeddings=source.tie_word_embeddings, bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id, pad_token_id=getattr(source, "pad_token_id", None),
        num_local_experts=experts, num_experts_per_tok=top_k, router_jitter_noise=0.0, sliding_window=None,
        dtype=next(dense.parameters()).dtype)
    with no_init_weights():  # every weight is assigned below; buffers (rotary) are computed as usual
        model = MixtralForCausalLM(config)
    state = {key: value for key, value in dense.state_dict().items() if ".mlp." not in key}
    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(dense.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{index}.mlp"
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()  # (2I, H)
        state[f"{prefix}.experts.gate_up_proj"] = gate_up.expand(experts, *gate_up.shape).clone()  # (E, 2I, H)
        down = mlp.down_proj.weight.detach()  # (H, I)
        state[f"{prefix}.experts.down_proj"] = down.expand(experts, *down.shape).clone()  # (E, H, I)
        router = torch.randn(experts, config.hidden_size, generator=generator)  # (E, H)
        state[f"{prefix}.gate.weight"] = router.to(gate_up.dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"upcycling: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.eval()


def main() -> int:
    from compressor.model import loading as models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    name = f"{Path(args.model).name}-moe{args.experts}x{args.top_k}"
    out = args.out or models.cache_dir() / "models" / name
    if not (out / "config.json").is_file():
        dense, tokenizer = models.load(args.model)
        model = upcycle(dense, args.experts, args.top_k, args.seed)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
