"""Several streams through one model: one batched step per 80 ms frame for all of them, each
stream (a row of the batch) at its own position, as the servers' slots need (`web.asr`).

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


class BatchedStepper:
    """A text-only model (Kyutai's speech-to-text: `dep_q` 0) stepped for `rows` streams at
    once. `step(codes, active)` runs one batched step: each active row takes its stream's next
    frame, the others stand still. Runs on the thread that loaded the model (MLX's arrays are
    thread-local). `reset_row(r)` starts a new stream on row r.

    Each row's inputs are those `models.LmGen` builds for one stream: the text token of its
    previous step (`text_initial_token` at its first), and for each input codebook with delay d
    the code of its step t - 1 - d (the padding token before that)."""

    def __init__(self, model: models.Lm, rows: int, text_sampler: utils.Sampler | None = None,
                 context: int | None = None):
        """`context`: steps each stream attends to (default: the model's `kv_context`, else its
        config's)."""
        cfg = model.cfg
        if cfg.dep_q:
            raise ValueError("the batched stepper runs text-only models (dep_q 0, speech to "
                             f"text); this one generates {cfg.dep_q} audio codebooks")
        self.model = model
        self.cfg = cfg
        self.rows = rows
        self.text_sampler = text_sampler or utils.Sampler(temp=0.0)
        self.steps = RowSteps(rows, context or model.kv_context or cfg.context)
        self.cache = [RowKVCache(self.steps) for _ in model.transformer.layers]
        self.delays = cfg.audio_delays
        self.num_user_codebooks = cfg.num_user_codebooks
        self._text = np.full(rows, cfg.text_initial_token, np.int64)
        self._codes = [deque(maxlen=max(self.delays) + 1) for _ in range(rows)]

    @property
    def positions(self) -> np.ndarray:
        """Steps taken by each row's stream."""
        return self.steps.positions

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
        self.steps.prepare()
        text, audio = self._inputs()
        hidden, logits = self.model(text, audio, cache=self.cache, mask=self.steps.mask)
        tokens = self.text_sampler(logits[:, -1])[0]
        heads = [p[:, 0, 0] for p in self.model.extra_head_probs(hidden)]
        prs = mx.stack(heads, axis=1) if heads else mx.zeros((self.rows, 0))
        mx.eval(tokens, prs, *[(c.keys, c.values) for c in self.cache])
        tokens, prs = np.array(tokens), np.array(prs, np.float32)
        for row in np.flatnonzero(active):
            self._text[row] = tokens[row]
            self._codes[row].append(codes[row].copy())
            self.steps.positions[row] += 1
        return tokens, prs
