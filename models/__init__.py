"""Model families built from ``mcore``: GPTModel, Hugging Face loading/saving, generation.

    model = models.from_pretrained("path/to/hf_dir")  # a family of models.FAMILIES
    logits = model(input_ids)                                 # [b, s, V]
    tokens = models.generate(model, [[1, 2, 3]], max_new_tokens=16)
    model.save_pretrained("out_dir")                          # loadable by transformers

A directory that cannot be loaded raises ``models.LoadError`` (a ``ValueError``) naming the file
and tensor.
"""
from models.errors import LoadError
from models.generate import generate
from models.gpt import GPTModel, StageSpec
from models.hf import FAMILIES, build_from_config, from_pretrained, save_pretrained

__all__ = ["GPTModel", "StageSpec", "from_pretrained", "save_pretrained", "generate",
           "build_from_config", "FAMILIES", "LoadError"]
