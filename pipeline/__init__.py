"""embedpipe: sentence embeddings, dedup and hard-negative mining over corpora in object storage, on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("embedpipe")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"
