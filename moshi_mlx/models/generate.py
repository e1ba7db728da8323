"""Streaming generation: one call per 80 ms frame, with Moshi's codebook delays."""

from collections import deque

import mlx.core as mx

from ..utils.compile import compile_with_state
from ..utils.sampling import Sampler
from .conditioner import ConditionTensor
from .lm import Lm, guided

MAX_COMPILED_SAMPLERS = 8  # compiled depformer samplings kept (each sampler compiles once)


class DepformerSamplings(dict):
    """The depformer's sampling of one step for a batch, compiled (unless `compile` is False)
    once per (sampler, codebooks) and kept, the last `MAX_COMPILED_SAMPLERS` of them: a new
    stream with the same samplers does not compile again."""

    def __init__(self, depformer, cfg_coef: float = 1.0, compile: bool = True):
        super().__init__()
        self.depformer = depformer
        self.cfg_coef = cfg_coef
        self.compile = compile

    def __call__(self, hidden: mx.array, text_token: mx.array, sampler: Sampler,
                 codebooks: int | None = None, keys: mx.array | None = None) -> mx.array:
        """hidden [B, 1, dim], text [B] -> the first `codebooks` audio codes [B, codebooks]
        (None: all dep_q). `keys`: each row's random key [B, 2] (None: MLX's global state)."""
        key = (sampler, codebooks, keys is None)
        if key not in self:
            depformer = self.depformer

            def sample(hidden, text_token, *keys):
                return depformer.sample(hidden, text_token, sampler, self.cfg_coef, codebooks,
                                        *keys)

            if self.compile:
                state = [depformer.state, mx.random.state]
                sample = compile_with_state(sample, inputs=state, outputs=[mx.random.state])
            if len(self) >= MAX_COMPILED_SAMPLERS:
                del self[next(iter(self))]  # the oldest
            self[key] = sample
        return self[key](hidden, text_token, *(() if keys is None else (keys,)))


class LmGen:
    """Runs Moshi one step at a time.

    Each `step(user_tokens)` feeds the user's Mimi codes for the current frame and samples Moshi's
    text token and audio codes. Delays follow Moshi's training layout: the input at step t holds,
    for a codebook with delay d, the token of position t-1-d (the audio padding token `card`
    before the stream starts), and the text input is the previous text token (`text_card` at the
    first step). Moshi's codebook k sampled at step t belongs to frame t - delays[k], so a frame
    is complete `max_delay` steps after its semantic code was sampled.

    Memory is flat: the temporal transformer keeps the last `context` steps in a rotating cache
    and only the last `max_delay + 1` steps of tokens are kept here.

    Classifier-free guidance (`cfg_coef` != 1) runs 2B rows: the conditioned ones, then the
    unconditioned ones, fed the same tokens, their logits mixed as `uncond + cfg_coef * (cond -
    uncond)` before sampling. The condition (`ct` of `step`) then has 2B rows (e.g. Hibiki's
    "very_good" then "very_bad" descriptions), or B rows given to the conditioned half only.
    A text-only model (`dep_q` 0, speech to text) samples text alone.
    """

    def __init__(
        self,
        model: Lm,
        max_steps: int | None = None,
        text_sampler: Sampler | None = None,
        audio_sampler: Sampler | None = None,
        batch_size: int = 1,
        cfg_coef: float = 1.0,
        check: bool = False,
        on_text_hook=None,
        on_audio_hook=None,
        compile: bool = True,
        context: int | None = None,
        kv_bits: int | None = None,
    ):
        """
        Args:
            model: the language model (`Lm`), its weights loaded.
            max_steps: accepted for compatibility with Kyutai's `LmGen`; not a limit (a stream
                can run for any number of steps).
            text_sampler, audio_sampler: how text tokens and audio codes are sampled (default:
                `Sampler()`).
            batch_size: streams stepped together (B).
            cfg_coef: classifier-free guidance; 1 for none.
            check: accepted for compatibility; inputs are always built from sampled tokens.
            on_text_hook, on_audio_hook: called with each step's text [B] and audio codes
                [B, dep_q].
            compile: compile the depformer's per-step sampling.
            context: steps the temporal transformer attends to (its KV cache); None: the
                model's (see `Lm.make_cache`).
            kv_bits: quantize that cache to 4 or 8 bits; None: the activation dtype.
        """
        cfg = model.cfg
        self.model = model
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.cfg_coef = cfg_coef
        self.on_text_hook = on_text_hook
        self.on_audio_hook = on_audio_hook
        self.compile = compile
        self.context = context
        self.kv_bits = kv_bits
        self.dep_q = cfg.dep_q
        self.num_user_codebooks = cfg.n_q - cfg.dep_q
        self.audio_delays = cfg.audio_delays
        self.max_delay = max(self.audio_delays)
        self._padding = mx.full((batch_size,), cfg.audio_padding_token, mx.int32)
        self.codebooks: int | None = None  # sample only the first ones (None: all dep_q)
        self._compiled = DepformerSamplings(model.depformer, cfg_coef, compile)
        self.reset(text_sampler or Sampler(), audio_sampler or Sampler())

    def reset(self, text_sampler: Sampler | None = None,
              audio_sampler: Sampler | None = None) -> None:
        """Starts a new stream (empty cache, step 0). What was compiled for a sampler is kept: a
        new stream does not compile again.

        Args:
            text_sampler, audio_sampler: the new stream's samplers; None keeps the current one.
        """
        self.text_sampler = text_sampler or self.text_sampler
        self.audio_sampler = audio_sampler or self.audio_sampler
        self.step_idx = 0
        self.cache = self.model.make_cache(self.context, self.kv_bits)
        self._text: mx.array | None = None  # [B] text token of the previous step
        self._sampled: deque[mx.array] = deque(maxlen=self.max_delay + 1)  # [B, dep_q] per step
        self._user: deque[mx.array] = deque(maxlen=self.max_delay + 1)  # [B, n_user] per step

    def sample_audio(self, hidden: mx.array, text_token: mx.array,
                     keys: mx.array | None = None) -> mx.array:
        """The depformer's sampling of one step, (hidden [B, 1, dim], text [B]) -> [B, dep_q];
        `keys` as `DepformerSamplings`'."""
        return self._compiled(hidden, text_token, self.audio_sampler, self.codebooks, keys)

    def _past(self, history: deque, steps_ago: int) -> mx.array | None:
        """The entry stored `steps_ago` steps before the current one (1 = previous step)."""
        return history[-steps_ago] if 0 < steps_ago <= len(history) else None

    def input_tokens(self) -> tuple[mx.array, mx.array]:
        """Text [B, 1] and audio [B, n_q, 1] inputs of the current step."""
        t = self.step_idx
        b = self.batch_size
        if t == 0:
            text = mx.full((b,), self.model.cfg.text_initial_token, mx.int32)
        else:
            text = self._text
        columns = []
        for k, delay in enumerate(self.audio_delays):
            if k < self.dep_q:
                # Position t-1-delay of Moshi's codebook k was sampled at step t-1.
                source = self._sampled[-1] if t - 1 >= delay else None
                col = k
            else:
                source = self._past(self._user, delay + 1) if t - 1 >= delay else None
                col = k - self.dep_q
            columns.append(self._padding if source is None else source[:, col])
        return text[:, None], mx.stack(columns, axis=1)[:, :, None]

    def _rows(self, x: mx.array) -> mx.array:
        """The batch's inputs, doubled for guidance."""
        return x if self.cfg_coef == 1 else mx.concatenate([x, x])

    def _condition(self, ct: ConditionTensor | None) -> ConditionTensor | None:
        """`ct` for the model's rows: with guidance, B rows go to the conditioned half only."""
        if ct is None or self.cfg_coef == 1 or ct.tensor.shape[0] == 2 * self.batch_size:
            return ct
        cond = mx.broadcast_to(ct.tensor, (self.batch_size, ct.tensor.shape[-1]))
        return ConditionTensor(mx.concatenate([cond, mx.zeros_like(cond)]))

    def _step(self, user_tokens, ct: ConditionTensor | None) -> tuple[mx.array, mx.array]:
        user_tokens = mx.array(user_tokens).astype(mx.int32)
        expected = (self.batch_size, self.num_user_codebooks)
        if tuple(user_tokens.shape) != expected:
            raise ValueError(
                f"user_tokens must have shape [batch, codebooks] = {list(expected)}, "
                f"got {list(user_tokens.shape)}")
        text_in, audio_in = self.input_tokens()
        hidden, text_logits = self.model(self._rows(text_in), self._rows(audio_in),
                                         cache=self.cache, condition=self._condition(ct))
        text_token = self.text_sampler(guided(text_logits[:, -1], self.cfg_coef))[0]
        if self.on_text_hook is not None:
            self.on_text_hook(text_token)
        self._text = text_token
        self._user.append(user_tokens)
        if self.dep_q > 0:
            audio_tokens = self.sample_audio(hidden, text_token)
            if self.on_audio_hook is not None:
                self.on_audio_hook(audio_tokens)
            self._sampled.append(audio_tokens)
            mx.async_eval(text_token, audio_tokens)
        else:
            mx.async_eval(text_token)
        self.step_idx += 1
        return text_token[:, None], hidden[: self.batch_size]

    def step(self, user_tokens: mx.array, ct: ConditionTensor | None = None) -> mx.array:
        """Runs one 80 ms frame.

        Args:
            user_tokens: int32 [B, n_q - dep_q], the input stream's Mimi codes for this frame.
            ct: the condition (`model.condition_provider.condition_tensor(...)`), if any.

        Returns:
            The text token of this step, int32 [B, 1] (its evaluation is started, not awaited:
            `.item()` or `.tolist()` waits for it).

        Raises:
            ValueError: `user_tokens` is not [B, n_q - dep_q].
        """
        return self._step(user_tokens, ct)[0]

    def step_with_extra_heads(self, user_tokens: mx.array, ct: ConditionTensor | None = None
                              ) -> tuple[mx.array, list[mx.array]]:
        """`step`, with the model's extra heads (e.g. the STT models' voice activity).

        Returns:
            (text token [B, 1], the softmax of each extra head on this step's temporal output,
            [B, 1, extra_heads_dim] each).
        """
        text, hidden = self._step(user_tokens, ct)
        return text, self.model.extra_head_probs(hidden)

    def last_audio_tokens(self) -> mx.array | None:
        """
        Returns:
            The model's audio codes of the frame completed by the last step, int32 [B, dep_q];
            None while the delays fill (the first `max_delay` steps) and for text-only models.
        """
        frame = self.step_idx - 1 - self.max_delay
        if frame < 0 or self.dep_q == 0:
            return None
        columns = [
            self._past(self._sampled, self.step_idx - (frame + delay))[:, k]
            for k, delay in enumerate(self.audio_delays[: self.dep_q])
        ]
        return mx.stack(columns, axis=1)
