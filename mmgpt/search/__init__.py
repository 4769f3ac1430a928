"""Search an image folder by text or image with a model's contrastive embeddings.

    >>> from mmgpt import load
    >>> from mmgpt.search import SearchIndex, build
    >>> vl = load("runs/demo/final")
    >>> build("photos/", vl, "photos.index")          # or update("photos.index", vl)
    >>> index = SearchIndex("photos.index")
    >>> index.search_text(vl, ["a red circle"], k=5)[0]  # [Hit(id, path, score), ...]

faiss is imported only when an index is built or opened.
"""

from mmgpt.search.index import Hit, SearchIndex, Summary, build, model_identity, update
from mmgpt.search.store import SearchIndexError

__all__ = ["Hit", "SearchIndex", "SearchIndexError", "Summary", "build", "model_identity", "update"]
