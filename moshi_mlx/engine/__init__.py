"""The live engine: a conversation's stages (Mimi encode, Moshi's step, Mimi decode, and the
apps' own audio coding) on threads of their own, joined by small bounded queues."""
