"""The expert library: a folder of experts with their routing data and the routing index, written crash-safe.

:class:`ExpertLibrary` is the folder (:mod:`moerge.library.store`); :class:`ExpertIndex` the FAISS index over
the experts' embeddings kept in it (:mod:`moerge.library.index`); :mod:`moerge.library.derive` makes libraries
from other libraries (Twin-Merging's split).
"""

from moerge.library.index import ExpertIndex
from moerge.library.store import ExpertLibrary

__all__ = ["ExpertLibrary", "ExpertIndex"]
