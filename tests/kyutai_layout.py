"""The tensor list of a Kyutai MLX checkpoint for a config dict, derived from how Kyutai's
`moshi_mlx` 0.3.0 builds its `Lm` (models/lm.py, modules/transformer.py, modules/conditioner.py),
independently of this package's modules. Writes the manifests in tests/data:

    python tests/kyutai_layout.py

Kyutai's sizes: the temporal MLP is sized from `dim_feedforward = 4 * dim` (hidden 11 * dim / 4,
which is PyTorch's 2 * 4.125 * dim / 3); the depformer's from `depformer_dim_feedforward`
(hidden 2 * ff / 3). Quantization (`nn.quantize`) replaces the weight of every leaf Linear and
Embedding by uint32 words plus bf16 scales and biases; an embedding with a low-rank or demux
projection is not a leaf and keeps its table. One deliberate difference: this package leaves the
conditioners unquantized (Kyutai's `nn.quantize` call would try to quantize their 16-wide tables,
which MLX refuses for group sizes 32 and 64, and Kyutai ships its conditioned model in bf16).
Kyutai's TTS (`cross_attention`) adds to each temporal layer `norm_cross` (a LayerNorm: weight
and bias) and `cross_attention.in_proj` / `out_proj`, named as Kyutai's MLX
`modules/transformer.py` names them (its `CrossAttention` and `TransformerLayer`).
"""

import json
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"
LAYOUTS = {
    "1b-202412": None,  # the built-in configs, as dicts, filled in by `builtin_dicts`
    "1b-202412-16rvq": None,
    "small_16rvq": "small_16rvq.json",
    "small_hibiki": "small_hibiki.json",
    "small_stt": "small_stt.json",
    "small_tts": "small_tts.json",
}


def _layer(prefix: str, dim: int, hidden: int) -> dict:
    return {
        f"{prefix}.norm1.weight": ("norm", [dim]),
        f"{prefix}.norm2.weight": ("norm", [dim]),
        f"{prefix}.self_attn.in_proj.weight": ("linear", [3 * dim, dim]),
        f"{prefix}.self_attn.out_proj.weight": ("linear", [dim, dim]),
        f"{prefix}.gating.linear_in.weight": ("linear", [2 * hidden, dim]),
        f"{prefix}.gating.linear_out.weight": ("linear", [dim, hidden]),
    }


def _embedding(prefix: str, vocab: int, dim: int, low_rank, demux: bool) -> dict:
    leaf = low_rank is None and not demux
    out = {f"{prefix}.weight": ("embedding" if leaf else "table", [vocab, low_rank or dim])}
    if low_rank is not None:
        out[f"{prefix}.low_rank.weight"] = ("linear", [dim, low_rank])
    if demux:
        out[f"{prefix}.out1.weight"] = ("linear", [dim, low_rank or dim])
        out[f"{prefix}.out2.weight"] = ("linear", [dim, low_rank or dim])
    return out


def plain_tensors(c: dict) -> dict:
    """name -> (kind, shape) before quantization; kind says what nn.quantize does with it."""
    d, dd = c["dim"], c["depformer_dim"]
    ff = c["depformer_dim_feedforward"]
    dep_hidden = 11 * dd // 4 if ff == 4 * dd else 2 * ff // 3
    demux = c.get("demux_second_stream", False)
    low_rank = c.get("depformer_low_rank_embeddings")
    t = _embedding("text_emb", c["text_card"] + 1, d, None, demux)
    for k in range(c["n_q"]):
        t[f"audio_embs.{k}.weight"] = ("embedding", [c["card"] + 1, d])
    for i in range(c["num_layers"]):
        prefix = f"transformer.layers.{i}"
        t.update(_layer(prefix, d, 11 * d // 4))
        if c.get("cross_attention"):
            t[f"{prefix}.norm_cross.weight"] = ("norm", [d])
            t[f"{prefix}.norm_cross.bias"] = ("norm", [d])
            t[f"{prefix}.cross_attention.in_proj.weight"] = ("linear", [3 * d, d])
            t[f"{prefix}.cross_attention.out_proj.weight"] = ("linear", [d, d])
    t["out_norm.weight"] = ("norm", [d])
    t["text_linear.weight"] = ("linear", [c.get("text_card_out") or c["text_card"], d])
    for k in range(c["dep_q"]):
        s = f"depformer.slices.{k}"
        vocab = c["text_card"] + 1 if k == 0 else c["card"] + 1
        t.update(_embedding(f"{s}.emb", vocab, dd, low_rank, demux and k == 0))
        t[f"{s}.linear_in.weight"] = ("linear", [dd, d])
        t[f"{s}.linear_out.weight"] = ("linear", [c["card"], dd])
        for i in range(c["depformer_num_layers"]):
            t.update(_layer(f"{s}.transformer.layers.{i}", dd, dep_hidden))
    for i in range(c.get("extra_heads_num_heads", 0)):
        t[f"extra_heads.{i}.weight"] = ("linear", [c.get("extra_heads_dim", 6), d])
    for name, cond in c.get("conditioners", {}).items():
        p = f"condition_provider.conditioners.{name}"
        params = cond[cond["type"]]
        if cond["type"] == "lut":
            t[f"{p}.embed.weight"] = ("conditioner", [params["n_bins"] + 1, params["dim"]])
        t[f"{p}.output_proj.weight"] = ("conditioner", [d, params["dim"]])
        t[f"{p}.learnt_padding"] = ("conditioner", [1, 1, d])
    return t


def tensors(c: dict, bits: int | None = None, group_size: int | None = None) -> dict:
    """name -> {"shape", "dtype"} of the file, bf16 or quantized with (bits, group_size)."""
    out = {}
    for name, (kind, shape) in plain_tensors(c).items():
        if bits is None or kind not in ("linear", "embedding"):
            out[name] = {"shape": shape, "dtype": "bfloat16", "st_dtype": "BF16"}
            continue
        base = name.removesuffix(".weight")
        rows, cols = shape
        groups = {"shape": [rows, cols // group_size], "dtype": "bfloat16", "st_dtype": "BF16"}
        out[name] = {"shape": [rows, cols * bits // 32], "dtype": "uint32", "st_dtype": "U32"}
        out[f"{base}.scales"] = groups
        out[f"{base}.biases"] = dict(groups)
    return out


def builtin_dicts() -> dict:
    """Kyutai's config1b_202412 and config1b_202412_16rvq as config.json dicts."""
    out = {}
    for name, dep_q in (("1b-202412", 8), ("1b-202412-16rvq", 16)):
        out[name] = {
            "dim": 2048, "text_card": 48000, "n_q": 2 * dep_q, "dep_q": dep_q, "card": 2048,
            "num_heads": 16, "num_layers": 16, "depformer_dim": 1024,
            "depformer_dim_feedforward": 4224, "depformer_num_heads": 16,
            "depformer_num_layers": 6, "delays": [0] + ([0] + [2] * (dep_q - 1)) * 2,
        }
    return out


def config_dict(layout: str) -> dict:
    if LAYOUTS[layout] is None:
        return builtin_dicts()[layout]
    return json.loads((DATA / LAYOUTS[layout]).read_text())


VARIANTS = {"bf16": (None, None), "q8": (8, 64), "q4": (4, 32)}


def main() -> int:
    for layout in LAYOUTS:
        for variant, (bits, group_size) in VARIANTS.items():
            t = tensors(config_dict(layout), bits, group_size)
            manifest = {
                "variant": f"{layout} {variant}",
                "derived_from": "moshi_mlx==0.3.0 (PyPI) models/lm.py, modules/*.py; "
                                "tests/kyutai_layout.py",
                "quantization": None if bits is None else {"bits": bits,
                                                           "group_size": group_size},
                "num_tensors": len(t),
                "tensors": dict(sorted(t.items())),
            }
            path = DATA / f"layout-{layout}.{variant}.json"
            path.write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
