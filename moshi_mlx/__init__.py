"""Moshi, Kyutai's full-duplex speech-text model, running on MLX."""

import importlib.util
import sys

__version__ = "0.1.0"


def _defer_package_start(name: str) -> None:
    """Lets `name`'s submodules be imported without running the package's own __init__ until
    an attribute of the package itself is asked for. mlx_lm's __init__ imports its converter,
    generator and loader, hence `transformers` (and torch where it is installed): ~1.5 s and
    ~30 MB that the apps, which use only its caches, attention and samplers, do not need. No
    library offers this, hence these lines; `import mlx_lm; mlx_lm.load` still works."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed: the import that needs it says so
    package = importlib.util.module_from_spec(spec)

    def complete(attribute: str):
        del package.__getattr__
        spec.loader.exec_module(package)  # the package's __init__, in the same module
        return getattr(package, attribute)

    package.__getattr__ = complete
    sys.modules[name] = package


_defer_package_start("mlx_lm")
