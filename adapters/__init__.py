"""vtoken.adapters: one module per model family. Importing this package registers every adapter."""

from vtoken.adapters.llava import LlavaAdapter

__all__ = ["LlavaAdapter"]
