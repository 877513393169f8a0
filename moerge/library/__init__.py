"""The expert library: a folder of experts with their routing data and the routing index, written crash-safe.

:class:`ExpertLibrary` (:mod:`moerge.library.store`) is the folder as users and routers see it, a face over parts
with one job each: :mod:`~moerge.library.manifest` (``library.json``, the writers' lock, atomic commits),
:mod:`~moerge.library.experts` (the experts' folders), :mod:`~moerge.library.routing_data` (the routing data
routers store per expert and library-wide) and :mod:`~moerge.library.base_record` (the base the experts are for,
and the checks against it). :class:`ExpertIndex` (:mod:`moerge.library.index`) is the FAISS index over the
experts' embeddings kept in it; :mod:`moerge.library.derive` makes libraries from other libraries (Twin-Merging's
split).
"""

from moerge.library.index import ExpertIndex
from moerge.library.store import ExpertLibrary

__all__ = ["ExpertLibrary", "ExpertIndex"]
