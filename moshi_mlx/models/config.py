"""Moshi's language-model configuration, in the fields of Kyutai's `config.json`.

One class describes the whole family Kyutai runs on MLX: Moshi 7B, the 1B models (Hibiki's speech
translation, with a description conditioner and classifier-free guidance) and the speech-to-text
models (text only: no depformer, voice-activity heads).
"""

from dataclasses import MISSING, dataclass, field, fields


class ConfigError(ValueError):
    """A configuration that cannot describe a Moshi model; the message names the field."""


@dataclass
class TransformerArgs:
    """One transformer of the model (the temporal one or the depformer's), as
    `transformer.Transformer` builds it; made by `LmConfig.transformer_args` and
    `LmConfig.depformer_args` from the config's flat fields."""

    dim: int
    num_heads: int
    num_layers: int
    ffn_hidden: int
    context: int
    max_period: float
    rope: bool
    norm_f32: bool
    cross_attention: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass
class LmConfig:
    """Hyper-parameters of the temporal transformer and of the depformer.

    Field names are those of Kyutai's `config.json` so a repository's file maps onto this class
    one to one. Audio is modelled as `n_q` codebooks (the model's `dep_q` generated ones first,
    then the input stream's `n_q - dep_q`), each with a vocabulary of `card` codes; `delays` has
    one entry for the text stream followed by one per audio codebook, in steps of 80 ms.
    `dep_q = 0` is a text-only model (speech to text): no depformer.

    Optional parts: `conditioners` (name -> Kyutai's conditioner dict, summed into the input as
    `fuser` says), `depformer_weights_per_step_schedule` (codebook -> depformer weight set: the
    codebooks of a set share their input projection and transformer; the PyTorch files hold each
    set once, the MLX layout one copy per codebook),
    `depformer_low_rank_embeddings` (rank of the depformer's input embeddings),
    `demux_second_stream` (text input tokens carry two streams, `tok2 * (text_card + 1) + tok1`),
    `extra_heads_num_heads` x `extra_heads_dim` (linear heads on the temporal output, e.g. voice
    activity) and `stt_config` (input padding of the speech-to-text models, in seconds).

    Kyutai's TTS models add `cross_attention` (every temporal layer also attends to the
    conditioners the fuser lists under `cross`, e.g. the speaker embeddings `speaker_wavs`),
    `text_card_out` (text logits, when not `text_card`) and `tts_config` (`audio_delay` in
    seconds, `second_stream_ahead` words of lookahead on the demuxed second text stream).
    """

    dim: int
    text_card: int
    n_q: int
    dep_q: int
    card: int
    num_heads: int
    num_layers: int
    hidden_scale: float
    context: int
    max_period: float
    depformer_dim: int
    depformer_dim_feedforward: int
    depformer_num_heads: int
    depformer_num_layers: int
    delays: list[int]
    existing_text_padding_id: int = 3
    causal: bool = True
    layer_scale: float | None = None
    gating: str = "silu"
    norm: str = "rms_norm_f32"
    positional_embedding: str = "rope"
    depformer_causal: bool = True
    depformer_layer_scale: float | None = None
    depformer_multi_linear: bool = True
    depformer_context: int = 8
    depformer_max_period: float = 10000
    depformer_gating: str = "silu"
    depformer_pos_emb: str = "none"
    depformer_weights_per_step: bool = True
    depformer_weights_per_step_schedule: list[int] | None = None
    depformer_low_rank_embeddings: int | None = None
    demux_second_stream: bool = False
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    conditioners: dict = field(default_factory=dict)
    fuser: dict | None = None
    stt_config: dict | None = None
    cross_attention: bool = False
    text_card_out: int | None = None
    tts_config: dict | None = None
    # Keys of the source dict that do not describe the model (file names, sampling defaults...).
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_config_dict(cls, data: dict) -> "LmConfig":
        """Builds a config from a Kyutai `config.json` dict; unknown keys are kept in `extra`."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)} - {"extra"}
        required = {f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise ConfigError(f"model config is missing the field(s): {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_config_dict(self) -> dict:
        """The inverse of `from_config_dict` (model fields, then `extra`); the optional parts
        are written only when used, as in Kyutai's files."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            unused = f.name in OPTIONAL_FIELDS and value == _default(f)
            if f.name == "extra_heads_dim":
                unused = self.extra_heads_num_heads == 0
            if f.name == "extra" or unused:
                continue
            out[f.name] = value
        out["delays"] = list(self.delays)
        out.update(self.extra)
        return out

    def validate(self) -> None:
        def need(cond: bool, name: str, why: str):
            if not cond:
                value = getattr(self, name)
                raise ConfigError(f"invalid model config: field '{name}' = {value!r}: {why}")

        def is_int(value, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        for name in ("dim", "text_card", "n_q", "card", "num_heads", "num_layers",
                     "context", "depformer_dim", "depformer_dim_feedforward",
                     "depformer_num_heads", "depformer_num_layers", "depformer_context"):
            need(is_int(getattr(self, name), 1), name, "must be a positive integer")
        need(is_int(self.dep_q, 0), "dep_q", "must be a non-negative integer (0: text only)")
        need(is_int(self.extra_heads_num_heads, 0), "extra_heads_num_heads",
             "must be a non-negative integer")
        need(is_int(self.extra_heads_dim, 1), "extra_heads_dim", "must be a positive integer")
        need(isinstance(self.hidden_scale, (int, float)) and self.hidden_scale > 0,
             "hidden_scale", "must be a positive number")
        need(self.dim % self.num_heads == 0, "num_heads", f"must divide dim={self.dim}")
        need(self.depformer_dim % self.depformer_num_heads == 0, "depformer_num_heads",
             f"must divide depformer_dim={self.depformer_dim}")
        need(self.dep_q <= self.n_q, "dep_q", f"cannot exceed n_q={self.n_q}")
        need(isinstance(self.delays, (list, tuple)) and len(self.delays) == self.n_q + 1,
             "delays", f"needs n_q + 1 = {self.n_q + 1} entries (text, then each codebook)")
        need(all(isinstance(d, int) and d >= 0 for d in self.delays), "delays",
             "entries must be non-negative integers")
        need(self.delays[0] == 0, "delays", "the text stream (first entry) must have delay 0")
        need(0 <= self.existing_text_padding_id < self.text_card, "existing_text_padding_id",
             f"must be a token id below text_card={self.text_card}")
        need(self.causal is True, "causal", "only causal temporal transformers are supported")
        need(self.depformer_causal is True, "depformer_causal",
             "only a causal depformer is supported")
        need(self.layer_scale is None, "layer_scale", "layer scales are not supported (use null)")
        need(self.depformer_layer_scale in (None, False), "depformer_layer_scale",
             "layer scales are not supported (use null)")
        need(self.gating == "silu", "gating", "only 'silu' gating is supported")
        need(self.depformer_gating == "silu", "depformer_gating", "only 'silu' gating is supported")
        need(self.norm in ("rms_norm", "rms_norm_f32"), "norm",
             "must be 'rms_norm' or 'rms_norm_f32'")
        need(self.positional_embedding in ("rope", "none"), "positional_embedding",
             "must be 'rope' or 'none'")
        need(self.depformer_pos_emb in ("rope", "none"), "depformer_pos_emb",
             "must be 'rope' or 'none'")
        need(self.depformer_multi_linear is True, "depformer_multi_linear",
             "Moshi uses one input projection per codebook (true)")
        need(self.depformer_weights_per_step is True, "depformer_weights_per_step",
             "Moshi uses separate depformer weights per codebook (true)")
        need(self.depformer_context >= self.dep_q, "depformer_context",
             f"must cover the dep_q={self.dep_q} codebooks of a step")
        schedule = self.depformer_weights_per_step_schedule
        need(schedule is None or (
            isinstance(schedule, list) and len(schedule) == self.dep_q
            and all(is_int(i, 0) for i in schedule)), "depformer_weights_per_step_schedule",
            f"must be null or a list of dep_q={self.dep_q} weight indices (integers >= 0)")
        need(self.depformer_low_rank_embeddings is None
             or is_int(self.depformer_low_rank_embeddings, 1), "depformer_low_rank_embeddings",
             "must be null or a positive integer")
        need(isinstance(self.demux_second_stream, bool), "demux_second_stream",
             "must be true or false")
        need(isinstance(self.cross_attention, bool), "cross_attention", "must be true or false")
        need(self.text_card_out is None or is_int(self.text_card_out, 1), "text_card_out",
             "must be null or a positive integer")
        tts = self.tts_config
        need(tts is None or (isinstance(tts, dict)
                             and isinstance(tts.get("audio_delay", 0), (int, float))
                             and not isinstance(tts.get("audio_delay"), bool)
                             and 0 <= tts.get("audio_delay", 0) < 3600
                             and is_int(tts.get("second_stream_ahead", 0), 0)
                             and is_int(tts.get("max_speakers", 1), 1)), "tts_config",
             "must be null or an object with audio_delay (seconds >= 0) and "
             "second_stream_ahead, max_speakers (integers)")
        need(not (tts or {}).get("second_stream_ahead") or self.demux_second_stream,
             "tts_config", "second_stream_ahead needs demux_second_stream: true")
        need(not (tts or {}).get("multistream"), "tts_config",
             "multistream TTS models are not supported")
        self._validate_conditioners(need)
        stt = self.stt_config
        need(stt is None or (isinstance(stt, dict) and all(
            isinstance(stt.get(k, 0.0), (int, float)) and not isinstance(stt.get(k), bool)
            and 0 <= stt.get(k, 0.0) < 3600
            for k in ("audio_delay_seconds", "audio_silence_prefix_seconds"))), "stt_config",
            "must be null or an object whose audio_delay_seconds and "
            "audio_silence_prefix_seconds are numbers of seconds >= 0")

    def _validate_conditioners(self, need) -> None:
        conds = self.conditioners
        need(isinstance(conds, dict), "conditioners", "must be an object: name -> conditioner")
        for name, c in conds.items():
            kind = c.get("type") if isinstance(c, dict) else None
            need(kind in CONDITIONER_KEYS, "conditioners",
                 f"'{name}' must have a type 'lut' or 'tensor'")
            params = c.get(kind)
            need(isinstance(params, dict) and CONDITIONER_KEYS[kind] <= params.keys(),
                 "conditioners", f"'{name}' ({kind}) needs the keys "
                 f"{', '.join(sorted(CONDITIONER_KEYS[kind]))} under '{kind}'")
            need(isinstance(params["dim"], int) and params["dim"] > 0, "conditioners",
                 f"'{name}': dim must be a positive integer")
            if kind == "lut":
                values = params["possible_values"]
                need(params["tokenizer"] == "noop", "conditioners",
                     f"'{name}': only the 'noop' tokenizer is supported")
                need(isinstance(values, list) and values
                     and all(isinstance(v, str) for v in values), "conditioners",
                     f"'{name}': possible_values must be a list of strings")
                need(isinstance(params["n_bins"], int) and params["n_bins"] >= len(values),
                     "conditioners", f"'{name}': n_bins must be at least len(possible_values)")
        fuser = self.fuser or {}
        need(isinstance(fuser, dict), "fuser", "must be an object: method -> conditions")
        for method, names in fuser.items():
            if method in ("cross_attention_pos_emb", "cross_attention_pos_emb_scale"):
                continue
            need(method in ("sum", "cross", "prepend"), "fuser",
                 f"unknown method '{method}' (sum, cross, prepend)")
            need(method != "prepend" or not names, "fuser",
                 "'prepend' conditioning is not supported (only 'sum' and 'cross')")
            need(isinstance(names, list) and all(n in conds for n in names), "fuser",
                 f"'{method}' must list conditioners of 'conditioners'")
        cross = fuser.get("cross") or []
        need(all(conds[n]["type"] == "tensor" for n in cross), "fuser",
             "'cross' conditioners must be tensors (type 'tensor')")
        need(bool(cross) == self.cross_attention, "fuser" if cross else "cross_attention",
             "cross-attention layers and 'cross' conditioners go together (cross_attention: "
             "true needs the fuser to list its 'cross' conditioners)")
        summed = fuser.get("sum")
        need(not conds or summed is None or set(summed) | set(cross) == set(conds),
             "fuser", "every conditioner must be summed into the input ('sum') or read by "
                      "cross-attention ('cross')")

    @property
    def cross_conditioners(self) -> list[str]:
        """The conditioners cross-attention reads, in the fuser's order (none without it)."""
        return list((self.fuser or {}).get("cross") or [])

    @property
    def sum_conditioners(self) -> list[str]:
        """The conditioners summed into the input: the fuser's `sum`, else every non-cross one."""
        summed = (self.fuser or {}).get("sum")
        if summed is None:
            return [n for n in self.conditioners if n not in self.cross_conditioners]
        return list(summed)

    @property
    def text_logits(self) -> int:
        """Width of the text head: `text_card_out`, else `text_card`."""
        return self.text_card_out or self.text_card

    @property
    def num_user_codebooks(self) -> int:
        """Audio codebooks of the input stream (the user's voice, the speech to translate)."""
        return self.n_q - self.dep_q

    @property
    def generated_codebooks(self) -> int:
        """`dep_q`, under the name Kyutai's MLX `LmConfig` gives it."""
        return self.dep_q

    @property
    def other_codebooks(self) -> int:
        """`num_user_codebooks`, under the name Kyutai's MLX `LmConfig` gives it."""
        return self.num_user_codebooks

    @property
    def mimi_codebooks(self) -> int:
        """Codebooks Mimi must encode and decode for this model."""
        return max(self.dep_q, self.num_user_codebooks)

    @property
    def audio_delays(self) -> list[int]:
        """Delay in steps of each audio codebook (`delays` without the text entry)."""
        return list(self.delays[1:])

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def text_initial_token(self) -> int:
        """Text token fed at the first step (one past the text vocabulary)."""
        return self.text_card

    @property
    def audio_padding_token(self) -> int:
        """Audio token fed where a delayed codebook has no value yet (one past `card`)."""
        return self.card

    def transformer_args(self) -> TransformerArgs:
        """The temporal transformer's hyper-parameters."""
        return TransformerArgs(
            dim=self.dim, num_heads=self.num_heads, num_layers=self.num_layers,
            ffn_hidden=self.ffn_hidden, context=self.context, max_period=self.max_period,
            rope=self.positional_embedding == "rope", norm_f32=self.norm == "rms_norm_f32",
            cross_attention=self.cross_attention)

    def depformer_args(self) -> TransformerArgs:
        """The depformer's hyper-parameters (the `depformer_`-prefixed fields; its norms follow
        the temporal `norm`, as in Moshi)."""
        return TransformerArgs(
            dim=self.depformer_dim, num_heads=self.depformer_num_heads,
            num_layers=self.depformer_num_layers, ffn_hidden=self.depformer_ffn_hidden,
            context=self.depformer_context, max_period=self.depformer_max_period,
            rope=self.depformer_pos_emb == "rope", norm_f32=self.norm == "rms_norm_f32")

    @property
    def depformer_weight_sets(self) -> list[int]:
        """The depformer weight set of each generated codebook: the schedule, else one set per
        codebook."""
        return self.depformer_weights_per_step_schedule or list(range(self.dep_q))

    @property
    def ffn_hidden(self) -> int:
        return gated_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_ffn_hidden(self) -> int:
        return gated_hidden(self.depformer_dim, self.depformer_dim_feedforward)


OPTIONAL_FIELDS = {
    "depformer_weights_per_step_schedule", "depformer_low_rank_embeddings",
    "demux_second_stream", "extra_heads_num_heads", "extra_heads_dim", "conditioners", "fuser",
    "stt_config", "cross_attention", "text_card_out", "tts_config",
}
"""Fields of the models after Moshi 7B, left out of `to_config_dict` when unused."""

CONDITIONER_KEYS = {"lut": {"n_bins", "dim", "tokenizer", "possible_values"}, "tensor": {"dim"}}
"""The keys each conditioner type needs under its type name."""


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def gated_hidden(dim: int, dim_feedforward: int) -> int:
    """Width of the SiLU-gated MLP, as Moshi's PyTorch `ActivationGating` sizes it."""
    if dim_feedforward == 4 * dim:
        return 21 * dim // 8
    return 2 * dim_feedforward // 3


def config_v0_1() -> LmConfig:
    """Moshi 7B as released in 2024-09 (moshiko / moshika)."""
    return LmConfig(
        dim=4096,
        text_card=32000,
        existing_text_padding_id=3,
        n_q=16,
        dep_q=8,
        card=2048,
        num_heads=32,
        num_layers=32,
        hidden_scale=4.125,
        causal=True,
        layer_scale=None,
        context=3000,
        max_period=10000,
        gating="silu",
        norm="rms_norm_f32",
        positional_embedding="rope",
        depformer_dim=1024,
        depformer_dim_feedforward=4224,
        depformer_num_heads=16,
        depformer_num_layers=6,
        depformer_causal=True,
        depformer_layer_scale=None,
        depformer_multi_linear=True,
        depformer_context=8,
        depformer_max_period=10000,
        depformer_gating="silu",
        depformer_pos_emb="none",
        depformer_weights_per_step=True,
        delays=[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
    )


def config1b_202412() -> LmConfig:
    """Kyutai's 1B layout of 2024-12 (8 generated and 8 input codebooks, acoustic delay 2)."""
    return _config_1b(dep_q=8)


def config1b_202412_16rvq() -> LmConfig:
    """Kyutai's 1B layout of 2024-12 with 16 generated and 16 input codebooks."""
    return _config_1b(dep_q=16)


def _config_1b(dep_q: int) -> LmConfig:
    return LmConfig(
        dim=2048, text_card=48000, existing_text_padding_id=3, n_q=2 * dep_q, dep_q=dep_q,
        card=2048, num_heads=16, num_layers=16, hidden_scale=4.125, context=3000,
        max_period=100000, norm="rms_norm_f32", positional_embedding="rope",
        depformer_dim=1024, depformer_dim_feedforward=4224, depformer_num_heads=16,
        depformer_num_layers=6, depformer_context=dep_q, depformer_max_period=10000,
        depformer_pos_emb="none", delays=[0] + ([0] + [2] * (dep_q - 1)) * 2,
    )
