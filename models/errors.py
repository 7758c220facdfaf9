"""``LoadError``: a Hugging Face directory that cannot be loaded.

One type for every fault of the files themselves (``config.json`` that is not JSON or lacks a
required key, a safetensors header that is garbage or whose shapes do not match its bytes, a
shard listed in the index but missing, a missing / unexpected / non-finite tensor). The message
is one line naming the file and, where there is one, the tensor. A ``ValueError`` subclass, so
callers that caught ``ValueError`` keep working.
"""


class LoadError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and tensor."""
