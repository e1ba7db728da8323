"""`mx.compile` for a function with captured state, safe against a call that raises."""

from collections.abc import Callable

import mlx.core as mx

RandomState = type(mx.random.state)


def _slots(tree, found: list) -> list:
    """(container, key, array) for each array in `tree` (dicts, lists, modules, random state)."""
    if isinstance(tree, RandomState):
        found.append((tree, 0, tree[0]))
        return found
    for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
        if isinstance(value, mx.array):
            found.append((tree, key, value))
        elif isinstance(value, (dict, list, tuple, RandomState)):
            _slots(value, found)
    return found


def _put_back(slots: list) -> None:
    for container, key, array in slots:
        if isinstance(container, RandomState):
            # The random state has no setter: seeding with the key's 64 bits sets that key.
            high, low = array.tolist()
            mx.random.seed((high << 32) | low)
        else:
            container[key] = array


def compile_with_state(fun: Callable, inputs: list, outputs: list) -> Callable:
    """`mx.compile(fun, inputs=inputs, outputs=outputs)`, except that a call that raises leaves
    the state in `inputs` as it was.

    While it traces `fun`, `mx.compile` puts placeholder arrays into the containers of its
    captured inputs (a module's parameters, `mx.random.state`) and puts the real arrays back
    only when `fun` returns. After an exception those containers keep the placeholders, and
    every later use of the module or of the random state fails ("Attempting to eval an array
    without a primitive") until the process restarts.
    """
    compiled = mx.compile(fun, inputs=inputs, outputs=outputs)
    places: list = []  # (container, key) of each captured array, found once: walking is slow

    def call(*args):
        if not places:
            places.extend((container, key) for container, key, _ in _slots(inputs, []))
        saved = [(container, key, container[key]) for container, key in places]
        try:
            return compiled(*args)
        except BaseException:
            _put_back(saved)
            raise

    return call
