"""Command lines for Moshi weight files (thin: the work is `moshi_mlx.weights`'), each runnable
as `python -m weights_tools.<tool> --help`:

- `quantize`: bf16 checkpoint -> q4 / q8, tensor by tensor (low memory).
- `inspect`: what a checkpoint is (dtype, quantization, config, memory needed) from its header.
- `make_demo`: a small random model repository laid out like Kyutai's Hugging Face ones.
- `convert_pytorch`: Kyutai's PyTorch checkpoint -> MLX layout.
- `convert_helium`: a transformers Helium checkpoint -> Kyutai's MLX layout of Helium.
"""

from collections.abc import Callable

from moshi_mlx.cli import run_main


def run_tool(action: Callable[[], None], prog: str | None = None, one_line: bool = True) -> int:
    """Runs a tool's action through the commands' one error path (`moshi_mlx.cli.run_main`), with
    what the tools add: the files they read and write are the user's (an `OSError` is a one-line
    error), and a Ctrl-C leaves no output behind. Returns the exit code."""
    return run_main(action, "interrupted; no output was left behind", user_errors=(OSError,),
                    prog=prog, one_line=one_line)
