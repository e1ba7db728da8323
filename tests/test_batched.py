"""The batched stepper (`engine.batched`): each stream served in a batch gets the tokens and
voice-activity probabilities of the same stream served alone by `models.LmGen` (greedy), with
1, 2 and 4 streams at once, starting at different ticks, skipping ticks, past the context."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_config, random_model

from moshi_mlx import models, utils
from moshi_mlx.engine.batched import BatchedStepper

STEPS = 40


@pytest.fixture(scope="module")
def model() -> models.Lm:
    return random_model(load_config("small_stt"), seed=3)


def alone(model: models.Lm, codes: np.ndarray, context: int) -> tuple[list[int], np.ndarray]:
    """One stream through LmGen: its text tokens and its extra heads' probability of class 0."""
    gen = models.LmGen(model, text_sampler=utils.Sampler(temp=0), context=context)
    tokens, prs = [], []
    for frame in codes:
        token, heads = gen.step_with_extra_heads(mx.array(frame[None].astype(np.int32)))
        tokens.append(token.item())
        prs.append([h[0, 0, 0].item() for h in heads])
    return tokens, np.array(prs, np.float32)


def batched(stepper: BatchedStepper, streams: list[np.ndarray], starts: list[int],
            skips: list[set[int]]) -> list[tuple[list[int], np.ndarray]]:
    """The streams through one stepper: stream i joins at tick starts[i] and skips the ticks in
    skips[i] (no audio waiting)."""
    rows = stepper.rows
    done = [0] * len(streams)
    out = [([], []) for _ in streams]
    tick = 0
    while any(d < STEPS for d in done):
        active = np.zeros(rows, bool)
        codes = np.zeros((rows, stepper.num_user_codebooks), np.int64)
        for i, stream in enumerate(streams):
            if tick == starts[i]:
                stepper.reset_row(i)
            if tick >= starts[i] and done[i] < STEPS and tick not in skips[i]:
                active[i], codes[i] = True, stream[done[i]]
        tokens, prs = stepper.step(codes, active)
        for i in np.flatnonzero(active):
            out[i][0].append(int(tokens[i]))
            out[i][1].append(prs[i])
            done[i] += 1
        tick += 1
    return [(tokens, np.array(prs)) for tokens, prs in out]


@pytest.mark.slow
@pytest.mark.parametrize("context", [3000, 16], ids=["within-context", "past-context"])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_batched_equals_alone(model, count, context):
    rng = np.random.default_rng(count)
    streams = [rng.integers(0, model.cfg.card, size=(STEPS, 8)) for _ in range(count)]
    expected = [alone(model, s, context) for s in streams]
    assert len({tuple(t) for t, _ in expected}) == count  # the streams differ
    stepper = BatchedStepper(model, rows=4, context=context)
    # a first stream on every row, then the streams under test on rows used before
    batched(stepper, [rng.integers(0, 2048, size=(STEPS, 8)) for _ in range(4)], [0] * 4,
            [set()] * 4)
    got = batched(stepper, streams, starts=[0, 3, 7, 11][:count],
                  skips=[set(), {5, 6, 20}, set(range(10, 40, 3)), set()][:count])
    for (tokens, prs), (want_tokens, want_prs) in zip(got, expected):
        assert tokens == want_tokens
        np.testing.assert_array_equal(prs, want_prs)
    assert prs.shape == (STEPS, model.cfg.extra_heads_num_heads)


def test_refuses_models_that_speak():
    from conftest import tiny_config

    with pytest.raises(ValueError, match="text-only models"):
        BatchedStepper(models.Lm(tiny_config()), rows=2)


def test_codes_of_the_wrong_shape(model):
    stepper = BatchedStepper(model, rows=2)
    with pytest.raises(ValueError, match=r"codes must have shape \[2, 8\]"):
        stepper.step(np.zeros((1, 8)), np.ones(1, bool))
