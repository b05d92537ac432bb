"""The offline index job: KB + model -> FAISS index + entity feature store."""

__version__ = "0.1.0"
