"""Audio in and out: constants, Mimi, wav files, sound devices, echo cancellation."""
