"""vtoken.adapters: one module per model family. Importing this package registers every adapter."""

from vtoken.adapters.llava import LlavaAdapter
from vtoken.adapters.llava_next import LlavaNextAdapter
from vtoken.adapters.llava_onevision import LlavaOnevisionAdapter
from vtoken.adapters.qwen import QwenVLAdapter
from vtoken.adapters.qwen3 import Qwen3VLAdapter
from vtoken.adapters.vit import OpenClipAdapter, TimmViTAdapter

__all__ = ["LlavaAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter", "OpenClipAdapter", "Qwen3VLAdapter",
           "QwenVLAdapter", "TimmViTAdapter"]
