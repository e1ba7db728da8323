"""Moshi's language model: a temporal transformer over 80 ms steps and a depformer over codebooks.

Shapes use `B` for batch, `T` for steps (12.5 Hz), `K` for audio codebooks.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ConcatenateKVCache

from ..utils.sampling import Sampler
from . import checkpoint
from .conditioner import ConditionProvider, ConditionTensor
from .config import LmConfig, TransformerArgs
from .transformer import RMSNorm, Transformer

ZERO_TOKEN = -1
"""Input token meaning 'nothing here': it embeds to an all-zero vector (as in Moshi)."""


def activation_dtype_for(quantized: bool, weight_dtype: mx.Dtype = mx.bfloat16) -> mx.Dtype:
    """The dtype activations run in, chosen from the weights and the backend (measured, see
    BENCHMARKS.md): quantized models use bf16 on a GPU but float32 on the CPU, where MLX's
    quantized matmuls are several times faster with float32 inputs; unquantized models use
    their weights' own dtype, which avoids converting every weight at every step."""
    if quantized:
        return mx.bfloat16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32
    return weight_dtype


def pick_activation_dtype(model: "Lm") -> mx.Dtype:
    """`activation_dtype_for` a built model."""
    quantized = isinstance(model.text_linear, nn.QuantizedLinear)
    return activation_dtype_for(quantized, model.out_norm.weight.dtype)


def quantizes(path: str, module: nn.Module) -> bool:
    """Which modules `quantize` quantizes: every Linear and Embedding (as `nn.quantize` does)
    except the conditioners', which are evaluated once per conversation and stay exact."""
    return hasattr(module, "to_quantized") and not path.startswith("condition_provider.")


def quantize(model: nn.Module, bits: int | None = None, group_size: int | None = None,
             layout: dict[str, checkpoint.Quantization] | None = None) -> None:
    """Quantizes `model` in place, as Kyutai's quantized MLX checkpoints are laid out: every
    module `quantizes` selects, at `bits` and `group_size`; or, with `layout` (module path ->
    quantization, e.g. a file's from `checkpoint.module_quantization`), those it names, each at
    its own (mixed precision), the others left unquantized."""
    if layout is None:
        nn.quantize(model, group_size=group_size, bits=bits, class_predicate=quantizes)
    else:
        def params(path: str, module: nn.Module) -> dict | bool:
            q = layout.get(path)
            if q is None or not quantizes(path, module):
                return False
            return {"bits": q.bits, "group_size": q.group_size}

        nn.quantize(model, class_predicate=params)
    if isinstance(model, Lm):
        model.depformer.tie_weights()  # nn.quantize replaced each slice's input projection


def embed(emb: nn.Module, tokens: mx.array) -> mx.array:
    """Looks tokens up in a (possibly quantized) embedding; ZERO_TOKEN gives zeros."""
    out = emb(mx.maximum(tokens, 0))
    return mx.where((tokens == ZERO_TOKEN)[..., None], mx.zeros((), out.dtype), out)


class ScaledEmbedding(nn.Embedding):
    """Moshi's token embedding with its two options.

    `low_rank`: the table has `low_rank` columns, projected to `dim` by `low_rank` (a Linear).
    `demux`: a token `tok2 * vocab + tok1` carries two streams; both are looked up in the same
    table, then projected by `out1` and `out2` and summed (`tok2` counts from 1; 0 means none).
    Without either it is a plain embedding, which `nn.quantize` quantizes like any other; with
    one, its table stays unquantized (it is not a leaf module) and its projections are.
    """

    def __init__(self, vocab: int, dim: int, low_rank: int | None = None, demux: bool = False):
        super().__init__(vocab, low_rank or dim)
        self.vocab = vocab
        self.demux = demux
        if low_rank is not None:
            self.low_rank = nn.Linear(low_rank, dim, bias=False)
        if demux:
            self.out1 = nn.Linear(low_rank or dim, dim, bias=False)
            self.out2 = nn.Linear(low_rank or dim, dim, bias=False)

    def __call__(self, tokens: mx.array) -> mx.array:
        """tokens: non-negative ids -> [..., dim]."""
        if self.demux:
            first = self.out1(self.weight[tokens % self.vocab])
            second = tokens // self.vocab - 1
            other = self.out2(self.weight[mx.maximum(second, 0)])
            return first + mx.where((second < 0)[..., None], mx.zeros((), other.dtype), other)
        out = self.weight[tokens]
        return self.low_rank(out) if "low_rank" in self else out


class DepFormerSlice(nn.Module):
    """The weights used for one codebook of a step: input projection, embedding of the previous
    token (text for the first codebook), a small transformer and the output head."""

    def __init__(self, in_vocab: int, cfg: LmConfig, args: TransformerArgs, demux: bool):
        super().__init__()
        self.emb = ScaledEmbedding(in_vocab, cfg.depformer_dim,
                                   cfg.depformer_low_rank_embeddings, demux)
        self.linear_in = nn.Linear(cfg.dim, cfg.depformer_dim, bias=False)
        self.transformer = Transformer(args)
        self.linear_out = nn.Linear(cfg.depformer_dim, cfg.card, bias=False)

    def __call__(self, hidden: mx.array, prev_token: mx.array, cache) -> mx.array:
        """hidden: [B, 1, dim]; prev_token: [B] -> logits [B, card]."""
        x = self.linear_in(hidden) + embed(self.emb, prev_token[:, None]).astype(hidden.dtype)
        return self.linear_out(self.transformer(x, cache=cache))[:, 0]


TIED_MODULES = ("linear_in", "transformer")
"""The modules of a depformer slice that all the slices of its weight set share."""


def tied_slices(cfg: LmConfig) -> dict[int, int]:
    """Slice k -> the first slice of its weight set (`cfg.depformer_weight_sets`), for the slices
    that use another's `TIED_MODULES`."""
    sets = cfg.depformer_weight_sets
    return {k: sets.index(w) for k, w in enumerate(sets) if sets.index(w) != k}


def tied_copies(cfg: LmConfig) -> list[str]:
    """Paths in `Lm` of the modules that are another slice's (`tied_slices`): an MLX-layout
    file holds copies of their tensors, which the model loads once."""
    return [f"depformer.slices.{k}.{name}" for k in tied_slices(cfg) for name in TIED_MODULES]


class DepFormer(nn.Module):
    """Samples the `dep_q` codebooks of one step one after the other. Slice k attends to the
    slices before it within the step (the cache starts empty at every step, and is passed in:
    the modules hold no state of a step).

    The slices of one weight set (Kyutai's TTS and Hibiki: `depformer_weights_per_step_schedule`)
    share their input projection and transformer: the same modules, one copy in memory, under
    each slice's name (Kyutai's MLX files hold a copy per slice; loading keeps one)."""

    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.cfg = cfg
        args = cfg.depformer_args()
        self.slices = [
            DepFormerSlice(cfg.text_card + 1 if k == 0 else cfg.card + 1, cfg, args,
                           demux=k == 0 and cfg.demux_second_stream)
            for k in range(cfg.dep_q)
        ]
        self.tie_weights()

    def tie_weights(self) -> None:
        """Gives each slice its weight set's `TIED_MODULES` (those of the set's first slice).
        `quantize` calls it again: `nn.quantize` replaces a Linear under each of its names."""
        for k, first in tied_slices(self.cfg).items():
            for name in TIED_MODULES:
                setattr(self.slices[k], name, getattr(self.slices[first], name))

    def _new_cache(self) -> list[ConcatenateKVCache]:
        # At most dep_q (8) entries per step: mlx_lm's concatenating cache is the right fit.
        return [ConcatenateKVCache() for _ in self.slices[0].transformer.layers]

    def __call__(self, hidden: mx.array, tokens: mx.array) -> mx.array:
        """Teacher-forced logits. hidden: [B, T, dim]; tokens: [B, dep_q, T], the input of each
        slice (the step's text token, then Moshi's codebooks 0..dep_q-2).
        Returns [B, T, dep_q, card]."""
        b, t, d = hidden.shape
        hidden = hidden.reshape(b * t, 1, d)
        tokens = tokens.transpose(0, 2, 1).reshape(b * t, -1)
        cache = self._new_cache()
        logits = [s(hidden, tokens[:, k], cache) for k, s in enumerate(self.slices)]
        return mx.stack(logits, axis=1).reshape(b, t, len(self.slices), -1)

    def sample(self, hidden: mx.array, text_token: mx.array, sampler: Sampler,
               cfg_coef: float = 1.0, codebooks: int | None = None,
               keys: mx.array | None = None) -> mx.array:
        """hidden: [B, 1, dim]; text_token: [B] -> Moshi's audio tokens [B, dep_q] (int32), or
        only the first `codebooks` of them.

        With `cfg_coef` != 1, `hidden` has 2B rows (conditioned, then unconditioned), both fed
        the same tokens, and each codebook samples from `guided(logits)`. `keys`: None draws
        from MLX's global random state; else each row's random key, uint32 [B, 2], split into
        one key per codebook."""
        slices = self.slices[:codebooks]
        if keys is not None:  # [B, codebooks, 2]
            keys = mx.stack([mx.random.split(keys[b], len(slices)) for b in range(keys.shape[0])])
        cache = self._new_cache()
        token = text_token
        out = []
        for k, s in enumerate(slices):
            fed = token if cfg_coef == 1 else mx.concatenate([token, token])
            token = sampler(guided(s(hidden, fed, cache), cfg_coef),
                            None if keys is None else keys[:, k])[0]
            out.append(token)
        return mx.stack(out, axis=1)


def guided(logits: mx.array, cfg_coef: float) -> mx.array:
    """Classifier-free guidance: logits of 2B rows (conditioned, then unconditioned) -> B rows
    `uncond + cfg_coef * (cond - uncond)`; unchanged when `cfg_coef` is 1."""
    if cfg_coef == 1:
        return logits
    cond, uncond = mx.split(logits, 2, axis=0)
    return uncond + cfg_coef * (cond - uncond)


class Lm(nn.Module):
    """Text embedding plus `n_q` audio-codebook embeddings, summed into the temporal transformer,
    whose normalised output feeds the text head and the depformer."""

    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.cfg = cfg
        self.text_emb = ScaledEmbedding(cfg.text_card + 1, cfg.dim,
                                        demux=cfg.demux_second_stream)
        self.audio_embs = [nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)]
        self.transformer = Transformer(cfg.transformer_args())
        self.out_norm = RMSNorm(cfg.dim, cfg.norm == "rms_norm_f32")
        self.text_linear = nn.Linear(cfg.dim, cfg.text_logits, bias=False)
        self.depformer = DepFormer(cfg)
        self.extra_heads = [nn.Linear(cfg.dim, cfg.extra_heads_dim, bias=False)
                            for _ in range(cfg.extra_heads_num_heads)]
        self.condition_provider = (
            ConditionProvider(cfg.dim, cfg.conditioners, cfg.fuser) if cfg.conditioners else None)
        self.activation_dtype: mx.Dtype | None = None  # None: `pick_activation_dtype`
        self.kv_context: int | None = None  # `make_cache`'s defaults (None: the config's context,
        self.kv_bits: int | None = None  # an unquantized cache), set by the apps' flags

    def embed(self, text_tokens: mx.array, audio_tokens: mx.array,
              condition: ConditionTensor | None = None) -> mx.array:
        """text_tokens: [B, T]; audio_tokens: [B, n_q, T]; condition: [B or 1, dim].
        Returns [B, T, dim]."""
        dtype = self.activation_dtype or pick_activation_dtype(self)
        x = embed(self.text_emb, text_tokens).astype(dtype)
        for k, emb in enumerate(self.audio_embs):
            x = x + embed(emb, audio_tokens[:, k]).astype(dtype)
        if condition is not None and condition.tensor is not None:
            x = x + condition.tensor[:, None, :].astype(dtype)
        return x

    def __call__(self, text_tokens: mx.array, audio_tokens: mx.array, cache=None,
                 condition: ConditionTensor | None = None, cross=None,
                 mask: mx.array | None = None):
        """Temporal transformer over T steps.

        text_tokens: [B, T]; audio_tokens: [B, n_q, T] (input tokens, delays already applied);
        `condition` (from `condition_provider.condition_tensor`) is summed into every step.
        With `cache` (from `make_cache`) the steps continue a stream, else they start one; either
        way each step attends causally to the last `context` steps (or as `mask` says, see
        `Transformer`). A cross-attention model (Kyutai's TTS) reads `cross`,
        `cross_keys_values(condition)` computed once per stream.
        Returns (hidden [B, T, dim] for the depformer, text logits [B, T, text_logits]).
        """
        x = self.embed(text_tokens, audio_tokens, condition)
        hidden = self.out_norm(self.transformer(x, cache=cache, cross=cross, mask=mask))
        return hidden, self.text_linear(hidden)

    def cross_keys_values(self, condition: ConditionTensor):
        """Each layer's cross-attention keys and values for `condition.cross` [B, S, dim]."""
        if condition.cross is None:
            raise ValueError("this condition has nothing for cross-attention (no 'cross' "
                             "conditioner of the fuser)")
        dtype = self.activation_dtype or pick_activation_dtype(self)
        return self.transformer.cross_keys_values(condition.cross.astype(dtype))

    def extra_head_probs(self, hidden: mx.array) -> list[mx.array]:
        """Softmax of each extra head (e.g. voice activity) on `hidden` [B, T, dim]."""
        return [mx.softmax(head(hidden).astype(mx.float32), axis=-1) for head in self.extra_heads]

    def make_cache(self, context: int | None = None, kv_bits: int | None = None):
        """Sliding-window KV caches of the temporal transformer: memory stays flat at `context`
        steps, quantized to `kv_bits` (4, 8); by default `kv_context` (else `cfg.context`) and
        `kv_bits` (None: unquantized). Raises ValueError for a context or bits the model cannot
        take."""
        context = self.kv_context if context is None else context
        kv_bits = self.kv_bits if kv_bits is None else kv_bits
        if context is not None and not 1 <= context <= self.cfg.context:
            raise ValueError(f"the context must be from 1 to the model's {self.cfg.context} "
                             f"steps, got {context}")
        return self.transformer.make_cache(context, kv_bits)

    def warmup(self, ct: ConditionTensor | None = None) -> None:
        """Runs one step (greedy) so kernels are built before a conversation starts."""
        b = 1
        text = mx.full((b, 1), self.cfg.text_initial_token, mx.int32)
        audio = mx.full((b, self.cfg.n_q, 1), self.cfg.audio_padding_token, mx.int32)
        if ct is None and self.cfg.cross_attention:
            ct = self.condition_provider.condition({})  # every condition empty
        if ct is not None:
            ct = ConditionTensor(*(None if t is None else t[:1] for t in (ct.tensor, ct.cross)))
        cross = self.cross_keys_values(ct) if self.cfg.cross_attention else None
        hidden, logits = self(text, audio, cache=self.make_cache(), condition=ct, cross=cross)
        greedy = Sampler(temp=0.0)
        text_token = greedy(logits[:, -1])[0]
        if self.cfg.dep_q > 0:
            text_token = self.depformer.sample(hidden, text_token, greedy)
        mx.eval(text_token)

    def load_weights(self, file_or_weights, strict: bool = True):
        """Loads a safetensors file (or a list of (name, array) pairs) into the model.

        With a file path and `strict`, the file's tensor names, shapes and quantization are
        checked against the model first; a mismatch raises `CheckpointError` naming the file, the
        tensor, what was expected and what was found.
        """
        if isinstance(file_or_weights, (str, Path)):
            path = Path(file_or_weights)
            if strict:
                checkpoint.check_file_matches_model(path, self)
            file_or_weights = list(checkpoint.load(path).items())
        return super().load_weights(file_or_weights, strict=strict)
