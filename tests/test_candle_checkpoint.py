"""A checkpoint in PyTorch's layout, as Kyutai's `-candle` repositories hold it (the one of
`kyutai/stt-1b-en_fr-candle` has the voice-activity heads that `-mlx` lacks), loads as the
MLX one: the repository of the demo STT model rewritten in PyTorch's names and shapes."""

import shutil

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from moshi_mlx import model_files
from moshi_mlx.models.checkpoint import read_header
from moshi_mlx.weights.demo import MOSHI_NAME, build_demo_repo
from moshi_mlx.weights.pytorch_layout import is_pytorch_layout, to_pytorch_layout


def test_a_candle_repository_loads_as_the_mlx_one(tmp_path):
    mlx_repo = build_demo_repo(tmp_path / "stt-mlx", seed=5, kind="stt")
    candle = tmp_path / "stt-candle"
    shutil.copytree(mlx_repo, candle)
    files = model_files.resolve_repo(str(mlx_repo))
    weights = mx.load(str(files.moshi_weight))
    mx.save_safetensors(str(candle / MOSHI_NAME), to_pytorch_layout(weights, files.lm_config))
    assert is_pytorch_layout(read_header(candle / MOSHI_NAME).tensors)
    ours, _, _ = model_files.load_model(files, warmup=False)
    theirs, _, _ = model_files.load_model(model_files.resolve_repo(str(candle)), warmup=False)
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(theirs.parameters()))
    assert a.keys() == b.keys() and any(k.startswith("extra_heads.") for k in a)
    for name in a:
        np.testing.assert_array_equal(np.array(a[name].astype(mx.float32)),
                                      np.array(b[name].astype(mx.float32)), err_msg=name)
