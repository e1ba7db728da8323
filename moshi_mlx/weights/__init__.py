"""Moshi's weight files without the model running: the layout of every tensor, a safetensors
writer, quantization tensor by tensor, random weights in the official layout and the demo model
repository that `--demo` builds (`weights_tools` holds their command lines)."""
