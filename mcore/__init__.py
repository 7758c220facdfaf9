"""msformers' library layer: parallel state, collectives and Megatron-style building blocks.

Importing ``mcore`` does not import MindSpore; the sub-modules that need it do.
"""
