"""One file per rule: the math (docstring), the torch backend, the autograd Function.

Importing this package registers every rule's torch kernels with the dispatcher.
"""
from . import elementwise, linear_epsilon, matmul, norm, softmax  # noqa: F401
from ._common import DEFAULT_EPSILON, stabilize  # noqa: F401
