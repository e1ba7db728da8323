"""Moshi's audio format. Imports nothing heavy, so modules that only move audio or bytes (the wire
protocol, sound devices, wav files) stay free of MLX."""

SAMPLE_RATE = 24000  # Hz, mono
FRAME_SIZE = 1920  # samples per frame (80 ms at 24 kHz): one model step
FRAME_RATE = SAMPLE_RATE / FRAME_SIZE  # 12.5 frames per second
FRAME_SECONDS = 1 / FRAME_RATE  # 0.08 s
