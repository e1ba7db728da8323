"""Several streams through one model: one batched step per 80 ms frame for all of them, each
stream (a row of the batch) at its own position, as the servers' slots need: speech to text
(`BatchedStepper`, `web.asr`) and text to speech (`BatchedTts`, `web.tts`).

Streams start and end at any time and a stream with no audio waiting skips a frame tick, so
the rows are never aligned: each row keeps its own step count (`positions`), its tokens of the
previous steps, and its keys and values in its own slots of the KV cache (`RowKVCache`). The
rotary embedding turns each row at its own position and a per-row mask lets a row attend only
to its own steps, so a stream's tokens are those of the same stream served alone. A row that
does not step in a tick is computed with the others (one shape for every step: no stall, no
copy of the cache when a stream joins or leaves) and its results are dropped: its position
does not move, and what it wrote is overwritten by its next real step.

mlx_lm's batch caches (`BatchKVCache`, `BatchRotatingKVCache`) align the rows on the right
(left padding) and move every row one step per call; a row that skips a tick would have to
be filtered out and merged back, copying the cache. Hence this cache, written per row.
"""

from collections import deque

import mlx.core as mx
import numpy as np

from .. import models, utils
from ..models.conditioner import ConditionTensor
from ..models.generate import DepformerSamplings
from ..models.tts import TtsGen, TtsStep

GROW_STEPS = 256  # the cache grows by this many slots at a time, up to the context


class RowKVCache:
    """One attention layer's keys and values for `rows` streams, [rows, heads, slots, head_dim]:
    row r's step t is kept in slot t % context (the oldest overwritten once full). Its layers
    share the positions and write slots of the step (`RowSteps`)."""

    def __init__(self, steps: "RowSteps"):
        self.steps = steps
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> mx.array:
        """Each row's position [rows]: the rotary embedding's offset."""
        return self.steps.offset

    def _grow(self, like: mx.array, size: int) -> mx.array:
        b, h, _, d = like.shape
        return mx.zeros((b, h, size, d), like.dtype)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """keys, values: [rows, heads, 1, head_dim] of this step -> every slot (the mask of
        `RowSteps` says which hold a row's steps)."""
        size = self.steps.size
        if self.keys is None:
            self.keys, self.values = self._grow(keys, size), self._grow(values, size)
        elif self.keys.shape[2] < size:
            more = size - self.keys.shape[2]
            self.keys = mx.concatenate([self.keys, self._grow(keys, more)], axis=2)
            self.values = mx.concatenate([self.values, self._grow(values, more)], axis=2)
        where = mx.broadcast_to(self.steps.slot[:, None, None, None], keys.shape)
        self.keys = mx.put_along_axis(self.keys, where, keys, axis=2)
        self.values = mx.put_along_axis(self.values, where, values, axis=2)
        return self.keys, self.values


class RowSteps:
    """The rows' positions (steps taken, each stream its own) and what one step of them needs:
    the rotary offsets, the slot each row writes, the slots allocated and the attention mask."""

    def __init__(self, rows: int, context: int):
        self.context = context
        self.positions = np.zeros(rows, np.int64)
        self.prepare()

    def prepare(self) -> None:
        """Before a step: offsets, slots and mask from the positions."""
        held = np.minimum(self.positions + 1, self.context)  # each row's steps, this one included
        self.size = min(self.context, -(-int(held.max()) // GROW_STEPS) * GROW_STEPS)
        self.offset = mx.array(self.positions)
        self.slot = mx.array(self.positions % self.context)
        # [rows, 1, 1, slots]: row r attends to its first `held[r]` slots (all once it wrapped)
        self.mask = (mx.arange(self.size)[None] < mx.array(held)[:, None])[:, None, None, :]


class RowBatch:
    """The temporal transformer of `model` stepped for `rows` streams at once, each row at its
    own position (`RowSteps`) with its keys and values in its own slots (`RowKVCache`). The
    steppers below build each row's inputs and take its outputs."""

    def __init__(self, model: models.Lm, rows: int, context: int | None = None):
        """`context`: steps each stream attends to (default: the model's `kv_context`, else its
        config's)."""
        self.model = model
        self.cfg = model.cfg
        self.rows = rows
        self.steps = RowSteps(rows, context or model.kv_context or model.cfg.context)
        self.cache = [RowKVCache(self.steps) for _ in model.transformer.layers]

    @property
    def positions(self) -> np.ndarray:
        """Steps taken by each row's stream."""
        return self.steps.positions

    def _forward(self, text: mx.array, audio: mx.array, **conditions
                 ) -> tuple[mx.array, mx.array]:
        """One step of every row: text [rows, 1], audio [rows, n_q, 1] -> (hidden [rows, 1,
        dim], text logits [rows, text_logits])."""
        self.steps.prepare()
        hidden, logits = self.model(text, audio, cache=self.cache, mask=self.steps.mask,
                                    **conditions)
        return hidden, logits[:, -1]

    def _cached(self) -> list[mx.array]:
        """What the step wrote, to evaluate with its outputs."""
        return [part for c in self.cache for part in (c.keys, c.values)]


class BatchedStepper(RowBatch):
    """A text-only model (Kyutai's speech-to-text: `dep_q` 0) stepped for `rows` streams at
    once. `step(codes, active)` runs one batched step: each active row takes its stream's next
    frame, the others stand still. Runs on the thread that loaded the model (MLX's arrays are
    thread-local). `reset_row(r)` starts a new stream on row r.

    Each row's inputs are those `models.LmGen` builds for one stream: the text token of its
    previous step (`text_initial_token` at its first), and for each input codebook with delay d
    the code of its step t - 1 - d (the padding token before that)."""

    def __init__(self, model: models.Lm, rows: int, text_sampler: utils.Sampler | None = None,
                 context: int | None = None):
        """`context`: as `RowBatch`'s."""
        cfg = model.cfg
        if cfg.dep_q:
            raise ValueError("the batched stepper runs text-only models (dep_q 0, speech to "
                             f"text); this one generates {cfg.dep_q} audio codebooks")
        super().__init__(model, rows, context)
        self.text_sampler = text_sampler or utils.Sampler(temp=0.0)
        self.delays = cfg.audio_delays
        self.num_user_codebooks = cfg.num_user_codebooks
        self._text = np.full(rows, cfg.text_initial_token, np.int64)
        self._codes = [deque(maxlen=max(self.delays) + 1) for _ in range(rows)]

    def reset_row(self, row: int) -> None:
        """Row `row` starts a new stream (its old keys are masked out, then overwritten)."""
        self.steps.positions[row] = 0
        self._text[row] = self.cfg.text_initial_token
        self._codes[row].clear()

    def _inputs(self) -> tuple[mx.array, mx.array]:
        """Text [rows, 1] and audio [rows, n_q, 1] inputs of the step."""
        padding = self.cfg.audio_padding_token
        audio = np.full((self.rows, len(self.delays)), padding, np.int64)
        for row, codes in enumerate(self._codes):
            for k, delay in enumerate(self.delays):
                if len(codes) > delay:
                    audio[row, k] = codes[-1 - delay][k]
        text = np.where(self.positions == 0, self.cfg.text_initial_token, self._text)
        return mx.array(text[:, None], mx.int32), mx.array(audio[:, :, None], mx.int32)

    def step(self, codes: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """codes: int [rows, n_q] (the Mimi codes of each active row's frame; any value for the
        others); active: bool [rows]. -> (text token of each row [rows], the extra heads'
        probability of their class 0, float32 [rows, heads]: the STT models' voice activity,
        'no speech for a while'; heads 0 for a model without). Rows not active: ignore."""
        codes = np.asarray(codes)
        if codes.shape != (self.rows, self.num_user_codebooks):
            raise ValueError(f"codes must have shape {[self.rows, self.num_user_codebooks]}, "
                             f"got {list(codes.shape)}")
        hidden, logits = self._forward(*self._inputs())
        tokens = self.text_sampler(logits)[0]
        heads = [p[:, 0, 0] for p in self.model.extra_head_probs(hidden)]
        prs = mx.stack(heads, axis=1) if heads else mx.zeros((self.rows, 0))
        mx.eval(tokens, prs, *self._cached())
        tokens, prs = np.array(tokens), np.array(prs, np.float32)
        for row in np.flatnonzero(active):
            self._text[row] = tokens[row]
            self._codes[row].append(codes[row].copy())
            self.steps.positions[row] += 1
        return tokens, prs


class BatchedTts(RowBatch):
    """Kyutai's TTS stepped for `rows` streams at once: `step({row: gen})` runs one batched
    step, each `TtsGen` given taking its stream's next step; the other rows are
    computed and dropped. Runs on the thread that loaded the model.

    Each stream keeps its own `TtsGen` (its state machine, its words, its samplers, its
    conditions): the step builds each row's inputs as the gen does alone, runs the temporal
    transformer once for every row (each reading its own speaker condition: the keys and values
    its gen computed when it started; its own summed conditions), hands each gen its row's text
    logits (its state machine chooses the token fed), then runs the depformer once for every
    row (its cache restarts at every step: the rows align there) and hands each gen its codes.
    Rows that share a sampler sample together. Every stream's tokens are those of the same
    stream stepped alone (`TtsGen.step`) with greedy samplers, and with a temperature when the
    stream has a seed of its own (`TtsGen(seed=)`: its random key); streams without one draw
    from MLX's global random state, so their draws depend on the other streams'. A stream with
    classifier-free guidance (two rows) is refused: it runs alone."""

    def __init__(self, model: models.Lm, rows: int, context: int | None = None):
        """`context`: as `RowBatch`'s."""
        cfg = model.cfg
        if not cfg.dep_q or cfg.num_user_codebooks:
            raise ValueError("not a TTS model: the batched TTS steps models that generate "
                             "audio codebooks from text alone")
        super().__init__(model, rows, context)
        self.samplings = DepformerSamplings(model.depformer)
        self._gens: list[TtsGen | None] = [None] * rows  # whose conditions are stacked
        self._conditions: dict = {}

    def step(self, gens: dict[int, TtsGen]) -> dict[int, TtsStep]:
        """One step of the streams in `gens` (row -> its generation) -> row -> its `TtsStep`
        (its frame's evaluation done)."""
        for row, gen in gens.items():  # a new stream starts at 0
            if gen.cfg_coef != 1:
                raise ValueError("classifier-free guidance (two rows a stream) is not batched: "
                                 "step that stream alone")
            self.steps.positions[row] = gen.step_idx
        if any(self._gens[row] is not gen for row, gen in gens.items()):
            for row, gen in gens.items():
                self._gens[row] = gen
            self._conditions = self._stack_conditions()
        hidden, logits = self._forward(*self._inputs(gens), **self._conditions)
        keys = {row: gen.step_keys() for row, gen in gens.items()}  # (text, audio) or Nones
        sampled = {}
        for (sampler, keyed), rows in _grouped(
                gens, lambda gen: (gen.text_sampler, gen.seeded)).items():
            rows_logits = mx.concatenate([gens[r].text_logits(logits[r:r + 1]) for r in rows])
            rows_keys = mx.concatenate([keys[r][0] for r in rows]) if keyed else None
            sampled.update(zip(rows, sampler(rows_logits, rows_keys)[0].tolist()))
        steps = {row: gen.choose_text(sampled[row]) for row, gen in gens.items()}
        fed = np.zeros(self.rows, np.int32)
        for row, s in steps.items():
            fed[row] = s.fed
        fed = mx.array(fed)
        sampling = {row: gen for row, gen in gens.items() if gen.samples_audio}
        for row in set(gens) - set(sampling):
            steps[row] = gens[row].take_audio(steps[row], None)
        for (sampler, codebooks, keyed), rows in _grouped(
                sampling, lambda gen: (gen.audio_sampler, gen.codebooks, gen.seeded)).items():
            rows_keys = None
            if keyed:  # every row draws; those of other groups with a key never used
                rows_keys = mx.concatenate([keys[r][1] if r in rows
                                            else mx.zeros((1, 2), mx.uint32)
                                            for r in range(self.rows)])
            codes = self.samplings(hidden, fed, sampler, codebooks, rows_keys)
            for row in rows:
                steps[row] = gens[row].take_audio(steps[row], codes[row:row + 1])
        mx.eval([s.frame for s in steps.values() if s.frame is not None], *self._cached())
        for row, gen in gens.items():  # a row that waits writes where its next step will
            self.steps.positions[row] = gen.step_idx
        return steps

    def _inputs(self, gens: dict[int, TtsGen]) -> tuple[mx.array, mx.array]:
        """Text [rows, 1] and audio [rows, n_q, 1]: each stepping row's as its gen builds them,
        a first step's for the others."""
        cfg = self.cfg
        idle = (mx.full((1, 1), cfg.text_initial_token, mx.int32),
                mx.full((1, cfg.n_q, 1), cfg.audio_padding_token, mx.int32))
        inputs = [gens[row].step_inputs() if row in gens else idle for row in range(self.rows)]
        return tuple(mx.concatenate(parts) for parts in zip(*inputs))

    def _stack_conditions(self) -> dict:
        """The rows' conditions for the model: `condition` (the summed ones, [rows, dim]) and
        `cross` (each layer's speaker keys and values, [rows, heads, S, head_dim], with a mask
        of each row's positions when the rows' speaker conditions differ in length)."""
        first = next(gen for gen in self._gens if gen is not None)
        gens = [gen or first for gen in self._gens]  # rows never used: any finite values
        out = {}
        if first.condition.tensor is not None:
            out["condition"] = ConditionTensor(
                mx.concatenate([gen.condition.tensor for gen in gens]))
        if first.cross is not None:
            lengths = [gen.cross[0][0].shape[2] for gen in gens]
            size = max(lengths)

            def stacked(layer: int, part: int) -> mx.array:
                rows = []
                for gen, length in zip(gens, lengths):
                    x = gen.cross[layer][part]
                    pad = mx.zeros((1, x.shape[1], size - length, x.shape[3]), x.dtype)
                    rows.append(x if length == size else mx.concatenate([x, pad], axis=2))
                return mx.concatenate(rows)

            mask = ()
            if min(lengths) < size:
                mask = ((mx.arange(size)[None] < mx.array(lengths)[:, None])[:, None, None],)
            out["cross"] = [(stacked(i, 0), stacked(i, 1), *mask) for i in range(len(first.cross))]
        return out


def _grouped(gens: dict, key) -> dict:
    """The rows of `gens` grouped by `key(gen)`, in order."""
    groups: dict = {}
    for row, gen in gens.items():
        groups.setdefault(key(gen), []).append(row)
    return groups
