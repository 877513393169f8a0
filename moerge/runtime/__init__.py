"""The runtime: a base model patched with expert banks, routed per request and mixed per token.

:class:`MoErgeModel` (:mod:`moerge.runtime.model`) is the facade; the patched module, the banks of experts' factors
and one request's gathered factors live in :mod:`moerge.runtime.layer`; the fused CUDA kernel in
:mod:`moerge.runtime.kernels`.
"""

from moerge.runtime.model import MoErgeModel

__all__ = ["MoErgeModel"]
