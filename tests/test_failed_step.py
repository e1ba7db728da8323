"""A step that fails (a bad sampling value, an error in a sampler) leaves the model, the random
state and later conversations as they were."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import random_model
from mlx.utils import tree_flatten

from moshi_mlx import models, utils
from moshi_mlx.utils.compile import compile_with_state

SEED = 11


class FailingSampler(utils.Sampler):
    """Draws its tokens (advancing the random state), then fails."""

    def __call__(self, logits, keys=None):
        super().__call__(logits, keys)
        raise RuntimeError("sampler failed")


TEXT_SAMPLER = utils.Sampler(temp=0.7, top_k=25)
AUDIO_SAMPLER = utils.Sampler(temp=0.8, top_k=25)


def conversation(gen, audio_sampler, steps=4, seed=SEED):
    """Moshi's text tokens and audio codes over `steps` steps of a seeded conversation, on
    `gen` reset for it."""
    mx.random.seed(seed)
    gen.reset(TEXT_SAMPLER, audio_sampler)
    users = np.random.default_rng(0).integers(0, gen.model.cfg.card, (steps, 1, 8))
    out = []
    for u in users.astype(np.int32):
        out.append(np.array(gen.step(mx.array(u))))
        out.append(np.array(gen._sampled[-1]))
    return np.concatenate([o.ravel() for o in out])


@pytest.mark.parametrize("reuse", [False, True], ids=["new_generator", "same_generator"])
@pytest.mark.parametrize("bad_sampler", [
    lambda cfg: utils.Sampler(temp=0.8, top_k=cfg.card + 1),
    lambda cfg: FailingSampler(temp=0.8, top_k=25),
], ids=["top_k_above_vocabulary", "sampler_raises"])
def test_a_failed_step_poisons_nothing(tiny_cfg, bad_sampler, reuse):
    """After the failure, the next conversation (on a new generator, or on the same one reset,
    as the server does) equals one before it."""
    model = random_model(tiny_cfg)
    weights = {name: np.array(p) for name, p in tree_flatten(model.parameters())}
    expected = conversation(models.LmGen(model), AUDIO_SAMPLER)

    gen = models.LmGen(model)
    with pytest.raises((ValueError, RuntimeError)):
        conversation(gen, bad_sampler(tiny_cfg), seed=SEED + 1)
    mx.eval(mx.random.normal((2,)))
    for name, p in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(p), weights[name], err_msg=name)
    gen = gen if reuse else models.LmGen(model)
    np.testing.assert_array_equal(conversation(gen, AUDIO_SAMPLER), expected)


def test_compile_with_state_puts_the_state_back_when_a_call_raises():
    layer = nn.Linear(3, 3)
    mx.eval(layer.parameters())
    weights = dict(tree_flatten(layer.parameters()))
    x = mx.ones((1, 3))

    def noisy(x, fail=False):
        y = layer(x) + mx.random.normal(x.shape)
        if fail:
            raise RuntimeError("failed while tracing")
        return y

    state = [layer.state, mx.random.state]
    failing = compile_with_state(partial(noisy, fail=True), inputs=state,
                                 outputs=[mx.random.state])
    mx.random.seed(5)
    key = np.array(mx.random.state[0])
    with pytest.raises(RuntimeError, match="while tracing"):
        failing(x)
    np.testing.assert_array_equal(np.array(mx.random.state[0]), key)
    assert all(p is weights[name] for name, p in tree_flatten(layer.parameters()))

    got = compile_with_state(noisy, inputs=state, outputs=[mx.random.state])(x)
    mx.random.seed(5)
    np.testing.assert_allclose(np.array(got), np.array(noisy(x)), rtol=1e-6)
