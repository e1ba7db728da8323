"""An independent float64 NumPy forward pass of Moshi's LM, written from the model's definition
(not from moshi_mlx's code), used to check the MLX implementation."""

import numpy as np


def rms_norm(x, w, eps=1e-8):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, base):
    """Rotates the pairs (x[2i], x[2i+1]) of x: [heads, T, D] by angle positions * base^(-2i/D)."""
    d = x.shape[-1]
    freqs = base ** (-np.arange(0, d, 2) / d)
    angle = positions[:, None] * freqs[None]
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def silu(x):
    return x / (1 + np.exp(-x))


def layer(x, p, prefix, heads, mask, rope_base=None, past=None):
    """One pre-norm transformer layer on x: [T, D].

    `mask` [T, T_past + T] says which keys each step sees. `past` is a list of (k, v) pairs
    computed earlier (possibly by other weights); the new pair is appended to it.
    """
    t, d = x.shape
    hd = d // heads
    h = rms_norm(x, p[f"{prefix}.norm1.weight"])
    qkv = (h @ p[f"{prefix}.self_attn.in_proj.weight"].T).reshape(t, 3, heads, hd)
    q, k, v = (qkv[:, i].transpose(1, 0, 2) for i in range(3))
    if rope_base is not None:
        pos = np.arange(t, dtype=np.float64)
        q, k = rope(q, pos, rope_base), rope(k, pos, rope_base)
    if past is not None:
        past.append((k, v))
        k = np.concatenate([kv[0] for kv in past], axis=1)
        v = np.concatenate([kv[1] for kv in past], axis=1)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
    scores = np.where(mask[None], scores, -np.inf)
    att = np.exp(scores - scores.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = (att @ v).transpose(1, 0, 2).reshape(t, d)
    x = x + o @ p[f"{prefix}.self_attn.out_proj.weight"].T
    h = rms_norm(x, p[f"{prefix}.norm2.weight"]) @ p[f"{prefix}.gating.linear_in.weight"].T
    gate, value = np.split(h, 2, axis=-1)
    return x + (silu(gate) * value) @ p[f"{prefix}.gating.linear_out.weight"].T


def temporal(p, cfg, text, audio):
    """text: [T]; audio: [n_q, T] input tokens -> (hidden [T, dim], text logits [T, text_card])."""
    t = text.shape[0]
    x = p["text_emb.weight"][text]
    for k in range(cfg.n_q):
        x = x + p[f"audio_embs.{k}.weight"][audio[k]]
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    mask = (j <= i) & (i - j < cfg.context)
    for n in range(cfg.num_layers):
        x = layer(x, p, f"transformer.layers.{n}", cfg.num_heads, mask, cfg.max_period)
    hidden = rms_norm(x, p["out_norm.weight"])
    return hidden, hidden @ p["text_linear.weight"].T


def depformer(p, cfg, hidden, tokens):
    """hidden: [dim] of one step; tokens: [dep_q] slice inputs -> logits [dep_q, card].

    Slice k runs its own weights on its own input and attends to the keys and values that the
    earlier slices computed at the same layer."""
    past = [[] for _ in range(cfg.depformer_num_layers)]
    logits = []
    for k in range(cfg.dep_q):
        s = f"depformer.slices.{k}"
        x = (p[f"{s}.linear_in.weight"] @ hidden + p[f"{s}.emb.weight"][tokens[k]])[None]
        mask = np.ones((1, k + 1), dtype=bool)
        for n in range(cfg.depformer_num_layers):
            x = layer(x, p, f"{s}.transformer.layers.{n}", cfg.depformer_num_heads, mask,
                      past=past[n])
        logits.append(p[f"{s}.linear_out.weight"] @ x[0])
    return np.stack(logits)
