"""Moshi's language-model configuration, in the fields of Kyutai's `config.json`."""

from dataclasses import MISSING, dataclass, field, fields


class ConfigError(ValueError):
    """A configuration that cannot describe a Moshi model; the message names the field."""


@dataclass
class LmConfig:
    """Hyper-parameters of the temporal transformer and of the depformer.

    Field names are those of Kyutai's `config.json` so a repository's file maps onto this class
    one to one. Audio is modelled as `n_q` codebooks (Moshi's `dep_q` first, then the user's),
    each with a vocabulary of `card` codes; `delays` has one entry for the text stream followed by
    one per audio codebook, in steps of 80 ms.
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
        """The inverse of `from_config_dict` (model fields only, then `extra`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["delays"] = list(self.delays)
        out.update(self.extra)
        return out

    def validate(self) -> None:
        def need(cond: bool, name: str, why: str):
            if not cond:
                value = getattr(self, name)
                raise ConfigError(f"invalid model config: field '{name}' = {value!r}: {why}")

        for name in ("dim", "text_card", "n_q", "dep_q", "card", "num_heads", "num_layers",
                     "context", "depformer_dim", "depformer_dim_feedforward",
                     "depformer_num_heads", "depformer_num_layers", "depformer_context"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 name, "must be a positive integer")
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

    @property
    def ffn_hidden(self) -> int:
        return gated_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_ffn_hidden(self) -> int:
        return gated_hidden(self.depformer_dim, self.depformer_dim_feedforward)


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
