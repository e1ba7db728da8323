"""Model files: finding them (`resolve`: the Hub, local paths, `hf://`, the demo repository),
the memory preflight (`memory`) and loading (`load`)."""
