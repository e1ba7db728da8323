"""Moshi, Kyutai's full-duplex speech-text model, running on MLX."""

import importlib.util
import sys

__version__ = "0.1.0"


class _DeferredPackageStart:
    """Lets a package's submodules be imported without running the package's own __init__
    until an attribute of the package itself is asked for. mlx_lm's __init__ imports its
    converter, generator and loader, hence `transformers` (and torch where installed): ~1.5 s
    and ~30 MB that the apps, which use only its caches, attention and samplers, do not need.
    No library offers this, hence this class; `import mlx_lm; mlx_lm.load` still works. A meta
    path finder and loader by their methods (importlib.abc's classes would cost 16 ms)."""

    def __init__(self, name: str):
        self.name = name
        self.real = None  # the package's own spec, once found

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once: from now on the package is in sys.modules
        self.real = importlib.util.find_spec(fullname)
        if self.real is None or self.real.submodule_search_locations is None:
            return None  # not installed (the import says so) or not a package
        spec = importlib.util.spec_from_loader(fullname, self, origin=self.real.origin,
                                               is_package=True)
        spec.submodule_search_locations = self.real.submodule_search_locations
        spec.has_location = self.real.has_location  # __file__, as the package's own
        return spec

    def create_module(self, spec):
        return None  # the usual module object

    def exec_module(self, module):
        real = self.real

        def start(attribute: str):
            del module.__getattr__
            real.loader.exec_module(module)  # the package's __init__, in the same module
            return getattr(module, attribute)

        module.__getattr__ = start


sys.meta_path.insert(0, _DeferredPackageStart("mlx_lm"))
