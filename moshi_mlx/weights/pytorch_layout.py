"""The tensors of Kyutai's PyTorch `moshi` checkpoints and where each goes in this package's
`Lm` (`conversion_rules`), the check of such a file against a config (`check_source`), and its
loading into a model (`load_pytorch_weights`): how run_tts reads Kyutai's TTS file as released,
and what `weights_tools.convert_pytorch` writes out in the MLX layout."""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from moshi_mlx.models import CheckpointError, LmConfig, checkpoint
from moshi_mlx.models.checkpoint import TensorInfo
from moshi_mlx.weights.common import source_problems


def is_pytorch_layout(tensors: dict[str, TensorInfo]) -> bool:
    """Whether a checkpoint's tensors are named as PyTorch `moshi` names them."""
    return "out_norm.alpha" in tensors


@dataclass(frozen=True)
class Rule:
    """One tensor of the PyTorch file and the MLX weights made from it.

    kind "copy": the tensor as is, to every target (several when codebooks share weights);
    "norm": an RMS norm scale of shape [1, 1, dim] flattened to [dim] and given to every target
    (the depformer's norms are shared by all its codebooks); "chunks": split into equal parts
    along the first axis, target i getting part `chunk_of[i]` (the released files stack the
    depformer's per-codebook attention weights; a weight schedule maps codebooks to parts).
    """

    source: str
    targets: tuple[str, ...]
    kind: str = "copy"
    chunk_of: tuple[int, ...] = ()

    @property
    def num_chunks(self) -> int:
        return max(self.chunk_of) + 1

    def source_shape(self, plain: dict[str, TensorInfo]) -> tuple[int, ...]:
        """The shape the source must have, given the unquantized model's parameter shapes."""
        shape = plain[self.targets[0]].shape
        if self.kind == "norm":
            return (1, 1, *shape)
        if self.kind == "chunks":
            return (self.num_chunks * shape[0], *shape[1:])
        return shape

    def source_of(self, weights: dict[str, mx.array]) -> mx.array:
        """The source tensor that `apply` turns back into `weights` (MLX names)."""
        if self.kind == "norm":
            return weights[self.targets[0]].reshape(1, 1, -1)
        if self.kind == "chunks":
            first = {}
            for target, c in zip(self.targets, self.chunk_of, strict=True):
                first.setdefault(c, weights[target])
            return mx.concatenate([first[c] for c in range(self.num_chunks)])
        return weights[self.targets[0]]

    def apply(self, source: mx.array) -> list[tuple[str, mx.array]]:
        if self.kind == "norm":
            source = source.reshape(-1)
        if self.kind == "chunks":
            parts = mx.split(source, self.num_chunks, axis=0)
            return [(t, parts[c]) for t, c in zip(self.targets, self.chunk_of, strict=True)]
        return [(t, source) for t in self.targets]


def _layer_rules(src: str, dst: list[str], weight_of: list[int] | None,
                 stacked: bool) -> list[Rule]:
    """Rules of PyTorch transformer layer `src` feeding the MLX layers `dst`: one layer for the
    temporal transformer (`weight_of` None), one per codebook for the depformer, codebook k
    using the depformer's weight set `weight_of[k]`."""
    rules = [
        Rule(f"{src}.{norm}.alpha", tuple(f"{d}.{norm}.weight" for d in dst), "norm")
        for norm in ("norm1", "norm2")
    ]
    sets = range(max(weight_of) + 1) if weight_of else [None]

    def users(w):
        return tuple(d for d, wk in zip(dst, weight_of or [None], strict=True) if wk == w)

    for proj in ("in_proj", "out_proj"):
        if stacked:
            name = "in_proj_weight" if proj == "in_proj" else "out_proj.weight"
            rules.append(Rule(f"{src}.self_attn.{name}",
                              tuple(f"{d}.self_attn.{proj}.weight" for d in dst), "chunks",
                              tuple(weight_of or [0])))
        else:
            rules += [Rule(f"{src}.self_attn.{proj}s.{w or 0}.weight",
                           tuple(f"{d}.self_attn.{proj}.weight" for d in users(w)))
                      for w in sets]
    for w in sets:
        gating = f"{src}.gating" if w is None else f"{src}.gating.{w}"
        rules += [Rule(f"{gating}.{lin}.weight",
                       tuple(f"{d}.gating.{lin}.weight" for d in users(w)))
                  for lin in ("linear_in", "linear_out")]
    return rules


def _cross_attention_rules(layer: str, stacked: bool) -> list[Rule]:
    """Rules of a temporal layer's cross-attention (Kyutai's TTS): its LayerNorm and its
    projections."""
    attn = f"{layer}.cross_attention"
    in_proj, out_proj = ((f"{attn}.in_proj_weight", f"{attn}.out_proj.weight") if stacked
                         else (f"{attn}.in_projs.0.weight", f"{attn}.out_projs.0.weight"))
    return [
        Rule(f"{layer}.norm_cross.weight", (f"{layer}.norm_cross.weight",)),
        Rule(f"{layer}.norm_cross.bias", (f"{layer}.norm_cross.bias",)),
        Rule(in_proj, (f"{attn}.in_proj.weight",)),
        Rule(out_proj, (f"{attn}.out_proj.weight",)),
    ]


def _embedding_rules(src: str, dst: str, low_rank: bool, demux: bool) -> list[Rule]:
    """Rules of a PyTorch `ScaledEmbedding`: its table and its low-rank or demux projections."""
    names = ["weight"]
    if low_rank:
        names.append("low_rank.weight")
    if demux:
        names += ["out1.weight", "out2.weight"]
    return [Rule(f"{src}.{n}", (f"{dst}.{n}",)) for n in names]


def stacked_layouts(names) -> tuple[bool, bool]:
    """Whether a file's self-attention and its cross-attention weights are stacked as in the
    released files (`in_proj_weight`) rather than named as `state_dict()` names them."""
    names = list(names)
    return (not any(".self_attn.in_projs." in n for n in names),
            not any(".cross_attention.in_projs." in n for n in names))


def conversion_rules(cfg: LmConfig, stacked: bool = True,
                     cross_stacked: bool | None = None) -> list[Rule]:
    """Every tensor of a PyTorch Moshi LM state dict and where it goes in `Lm`.

    `stacked`: attention weights as in the released files (`self_attn.in_proj_weight`,
    `self_attn.out_proj.weight`); otherwise as `moshi` >= 0.2 names them in `state_dict()`
    (`self_attn.in_projs.{k}.weight`, `self_attn.out_projs.{k}.weight`).
    """
    rules = [
        *_embedding_rules("text_emb", "text_emb", False, cfg.demux_second_stream),
        *(Rule(f"emb.{k}.weight", (f"audio_embs.{k}.weight",)) for k in range(cfg.n_q)),
        Rule("out_norm.alpha", ("out_norm.weight",), "norm"),
        Rule("text_linear.weight", ("text_linear.weight",)),
    ]
    for i in range(cfg.num_layers):
        layer = f"transformer.layers.{i}"
        rules += _layer_rules(layer, [layer], None, stacked)
        if cfg.cross_attention:
            rules += _cross_attention_rules(layer, stacked if cross_stacked is None
                                            else cross_stacked)
    weight_of = cfg.depformer_weight_sets
    low_rank = cfg.depformer_low_rank_embeddings is not None
    for w in range(max(weight_of, default=-1) + 1):
        users = tuple(f"depformer.slices.{k}.linear_in.weight"
                      for k in range(cfg.dep_q) if weight_of[k] == w)
        rules.append(Rule(f"depformer_in.{w}.weight", users))
    for k in range(cfg.dep_q):
        s = f"depformer.slices.{k}"
        emb = "depformer_text_emb" if k == 0 else f"depformer_emb.{k - 1}"
        demux = k == 0 and cfg.demux_second_stream
        rules += _embedding_rules(emb, f"{s}.emb", low_rank, demux)
        rules.append(Rule(f"linears.{k}.weight", (f"{s}.linear_out.weight",)))
    if cfg.dep_q > 0:
        for i in range(cfg.depformer_num_layers):
            dst = [f"depformer.slices.{k}.transformer.layers.{i}" for k in range(cfg.dep_q)]
            rules += _layer_rules(f"depformer.layers.{i}", dst, weight_of, stacked)
    rules += [Rule(f"extra_heads.{i}.weight", (f"extra_heads.{i}.weight",))
              for i in range(cfg.extra_heads_num_heads)]
    for name, c in cfg.conditioners.items():
        p = f"condition_provider.conditioners.{name}"
        parts = ["embed.weight"] if c["type"] == "lut" else []
        rules += [Rule(f"{p}.{n}", (f"{p}.{n}",))
                  for n in (*parts, "output_proj.weight", "learnt_padding")]
    return rules


def to_pytorch_layout(weights: dict[str, mx.array], cfg: LmConfig) -> dict[str, mx.array]:
    """An `Lm`'s unquantized weights (MLX names) -> the tensors of Kyutai's released PyTorch
    file (attention weights stacked), which `load_pytorch_weights` reads back to them."""
    return {rule.source: rule.source_of(weights) for rule in conversion_rules(cfg)}


def check_source(header: checkpoint.Header, rules: list[Rule], plain: dict[str, TensorInfo],
                 config_name: str) -> None:
    """Raises `CheckpointError` listing every missing, unexpected, misshapen or non-float
    tensor of the source file."""
    found = header.tensors
    problems = source_problems(found, {r.source: r.source_shape(plain) for r in rules})
    if problems:
        hint = "Pass the language model's file (not Mimi's) and the --config that matches it."
        if "audio_embs.0.weight" in found:
            hint = "This file is already in the MLX layout: load it directly, no conversion needed."
        raise CheckpointError(
            f"{header.path} is not a PyTorch Moshi LM checkpoint of {config_name}:\n"
            + "\n".join(problems) + "\n" + hint)


def load_pytorch_weights(model, path: str | Path) -> None:
    """Loads PyTorch moshi weights (either attention layout) into the unquantized `model`, in
    the file's dtype (a float32 file computes in float32, as Kyutai's MLX `run_tts` does; a
    bf16 one, as released, in bf16), after checking every tensor of the file against the
    model's config (`CheckpointError` lists what does not match)."""
    header = checkpoint.read_header(path)
    rules = conversion_rules(model.cfg, *stacked_layouts(header.tensors))
    expected = checkpoint.model_tensors(model)
    check_source(header, rules, expected, f"the config (dim {model.cfg.dim}, "
                                          f"{model.cfg.num_layers} layers)")
    arrays = checkpoint.load(path)
    weights = []
    for rule in rules:
        for name, value in rule.apply(arrays.pop(rule.source)):
            weights.append((name, value))
    model.load_weights(weights, strict=True)
