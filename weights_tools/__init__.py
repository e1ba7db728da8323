"""Command lines for Moshi weight files (thin: the work is `moshi_mlx.weights`'), each runnable
as `python -m weights_tools.<tool> --help`:

- `quantize`: bf16 checkpoint -> q4 / q8, tensor by tensor (low memory).
- `inspect`: what a checkpoint is (dtype, quantization, config, memory needed) from its header.
- `make_demo`: a small random model repository laid out like Kyutai's Hugging Face ones.
- `convert_pytorch`: Kyutai's PyTorch checkpoint -> MLX layout.
"""
