"""BERT (HF ``model_type`` "bert", ``BertForMaskedLM``): config mapping, layer spec, weight names.

Architecture: word + learned absolute position + token-type embeddings, then a LayerNorm;
post-norm layers (``LayerNorm(x + attention(x))``, ``LayerNorm(h + mlp(h))``) with
bidirectional multi-head attention (separate biased ``query`` / ``key`` / ``value``, fused
into our ``linear_qkv`` on load), a biased GELU MLP (``intermediate`` / ``output``); the MLM
head ``cls.predictions`` (dense, activation, LayerNorm, decoder tied to the word embedding,
vocabulary bias ``cls.predictions.bias``). The model is ``models.bert.BertModel`` (this
family's ``build_model``).
Ignored checkpoint tensors: the pooler and next-sentence head of pre-training checkpoints
(``bert.pooler.*``, ``cls.seq_relationship.*``), the tied copies ``cls.predictions.decoder.*``
and the ``embeddings.position_ids`` buffer of older files.
Rejected with the key's name: ``position_embedding_type`` other than "absolute", ``is_decoder``,
``add_cross_attention``, a ``hidden_act`` other than gelu / gelu_new / gelu_pytorch_tanh / relu,
and ``tie_word_embeddings=false`` (transformers 5 then uses ``cls.predictions.decoder.bias``
instead of ``cls.predictions.bias``, while 4.x ties the two whatever the key says).
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, TransformerConfig
from mcore.transformer.post_norm_layer import encoder_layer_spec
from models.bert import BertModel
from models.weights import Piece, pieces

MODEL_TYPES = ("bert",)
TIE_DEFAULT = True
IGNORED_SUFFIXES = ("bert.pooler.dense.weight", "bert.pooler.dense.bias",
                    "cls.seq_relationship.weight", "cls.seq_relationship.bias",
                    "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                    "embeddings.position_ids")
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu"}


def config_from_hf(hf: dict) -> TransformerConfig:
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"position_embedding_type={kind!r}: only 'absolute' is supported "
                         f"(model_type='bert')")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("tie_word_embeddings=false: not supported for model_type='bert' (the "
                         "MLM decoder is the word embedding)")
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key):
            raise ValueError(f"{key}=true: not supported for model_type='bert' (bidirectional "
                             f"encoder only)")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r}: unsupported (supported: {sorted(_ACTIVATIONS)})")
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        activation=_ACTIVATIONS[act], norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
        mlp_fc1_bias=True, mlp_fc2_bias=True, position_embedding="learned",
        max_position_embeddings=hf.get("max_position_embeddings", 512), embedding_norm=True,
        attention=AttentionConfig(qkv_bias=True, out_bias=True))


def layer_spec(cfg: TransformerConfig):
    return encoder_layer_spec(cfg)


def build_model(hf: dict, cfg: TransformerConfig, tie: bool, groups=None) -> BertModel:
    """The ``BertModel`` of ``hf`` (``tie`` is always True: ``config_from_hf`` refuses False)."""
    return BertModel(cfg, layer_spec(cfg), hf["vocab_size"],
                     type_vocab_size=hf.get("type_vocab_size", 2), groups=groups)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    h, emb = cfg.hidden_size, "bert.embeddings"
    table = {"embedding.weight": pieces(f"{emb}.word_embeddings.weight"),
             "position_embedding.weight": pieces(f"{emb}.position_embeddings.weight"),
             "token_type_embedding.weight": pieces(f"{emb}.token_type_embeddings.weight"),
             "lm_head.bias": pieces("cls.predictions.bias")}
    for kind in ("weight", "bias"):
        table[f"embedding_norm.{kind}"] = pieces(f"{emb}.LayerNorm.{kind}")
        table[f"lm_head.dense.{kind}"] = pieces(f"cls.predictions.transform.dense.{kind}")
        table[f"lm_head.norm.{kind}"] = pieces(f"cls.predictions.transform.LayerNorm.{kind}")
    for i in range(cfg.num_layers):
        hf, me = f"bert.encoder.layer.{i}", f"encoder.layers.{i}"
        for kind in ("weight", "bias"):
            table.update({
                f"{me}.self_attention.linear_qkv.{kind}": tuple(
                    Piece(f"{hf}.attention.self.{part}.{kind}", h)
                    for part in ("query", "key", "value")),
                f"{me}.self_attention.linear_proj.{kind}": pieces(
                    f"{hf}.attention.output.dense.{kind}"),
                f"{me}.attn_norm.{kind}": pieces(f"{hf}.attention.output.LayerNorm.{kind}"),
                f"{me}.mlp.linear_fc1.{kind}": pieces(f"{hf}.intermediate.dense.{kind}"),
                f"{me}.mlp.linear_fc2.{kind}": pieces(f"{hf}.output.dense.{kind}"),
                f"{me}.mlp_norm.{kind}": pieces(f"{hf}.output.LayerNorm.{kind}"),
            })
    return table
