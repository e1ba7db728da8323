"""Kyutai's other models live: Hibiki (with guidance) and an STT model through the live engine,
against their serial loop (`Conversation.step`, as `families.conversation` makes it), on
generated demo repositories."""

import json

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx import families, model_files, models, utils
from moshi_mlx.audio.constants import FRAME_SIZE
from moshi_mlx.engine.live_engine import LiveEngine
from moshi_mlx.engine.worker import ModelWorker
from moshi_mlx.weights.demo import build_demo_repo
from moshi_mlx.weights.mimi_layout import MIMI_FILE

pytestmark = pytest.mark.slow  # the live engine on demo models with Mimi processes

SAMPLERS = (utils.Sampler(temp=0.7, top_k=25, top_p=1.0),
            utils.Sampler(temp=0.8, top_k=250, top_p=1.0))
SEED = 4


def repo_files(root) -> model_files.ModelFiles:
    cfg = models.LmConfig.from_config_dict(json.loads((root / "config.json").read_text()))
    return model_files.ModelFiles(cfg, root / "model.safetensors", root / MIMI_FILE,
                                  root / "tokenizer_spm_demo.model", None)


@pytest.fixture(scope="module", params=["hibiki", "stt"])
def family(request, tmp_path_factory):
    root = build_demo_repo(tmp_path_factory.mktemp(request.param) / "repo", seed=5,
                           kind=request.param)
    cfg_coef = 3.0 if request.param == "hibiki" else 1.0
    worker = ModelWorker(families.live_loader(repo_files(root), SAMPLERS, cfg_coef))
    worker.load().result()
    yield request.param, worker, cfg_coef
    worker.close()


def test_the_live_engine_runs_them_as_their_serial_loop(family):
    kind, worker, cfg_coef = family
    pcm = np.random.default_rng(2).normal(0, 0.1, (10, FRAME_SIZE)).astype(np.float32)

    def serial():
        model = worker.conversation.gen.model
        conversation = families.conversation(model, worker.conversation.text_tokenizer,
                                             worker.conversation.mimi.path, *SAMPLERS,
                                             cfg_coef)
        mx.random.seed(SEED)
        return [conversation.step(f) for f in pcm]

    reference = worker.submit(serial).result()
    conversation = worker.submit(worker.new_conversation, *SAMPLERS, SEED).result()
    done = []
    engine = LiveEngine(conversation, worker.executor, on_output=done.append,
                        max_waiting=1000).start()
    for f in pcm:
        engine.put(f)
    assert engine.wait_idle(120)
    engine.stop()
    assert [f.token for f in done] == [r.token for r in reference]
    for f, r in zip(done, reference):
        if r.voice is None:
            assert f.voice is None
        else:
            np.testing.assert_array_equal(f.voice, r.voice)
    voices = sum(f.voice is not None for f in done)
    assert voices == (0 if kind == "stt" else len(pcm) - conversation.max_delay)
