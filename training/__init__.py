"""The training side of msformers: everything between the library and a user's run.

Read in this order:

- ``config.py``         one YAML schema (model, parallel, data, training, optimizer, checkpoint,
                        logging, lora) loaded into dataclasses, with ``section.key=value`` overrides;
                        a bad key or size fails before any work with one line naming the key
                        (checks in ``config_validate.py``).
- ``model_bridge.py``   the ``model`` section as a ``TransformerConfig`` and a ``GPTModel``.
- ``config_yaml.py``    strict YAML reading (duplicate keys, directories, non-UTF-8 refused).
- ``data/``             tokenizer (Hugging Face ``tokenizers`` byte-level BPE), the bundled
                        default corpus, a Megatron-compatible ``.bin``/``.idx`` indexed dataset,
                        the preprocessing command, and a deterministic, resumable, dp-split sampler.
- ``optim.py``          learning-rate schedule (warmup + cosine/linear decay) and weight-decay mask.
- ``checkpointing.py``  checkpoints through ``mcore/checkpoint`` (each rank's shards under global
                        names + one ``meta.json``; atomic; any layout loads any other), with
                        ``checkpoint_layout.py`` mapping a training step's tensors to global ones.
- ``logger.py``         progress line, ``metrics.jsonl``, per-rank log files, TensorBoard, MFU.

``tests/training/test_infra_loop.py`` wires all of them into a toy numpy loop (train, crash,
resume exactly): the template for ``pretrain.py``. None of the modules above imports MindSpore
(``model_bridge.py`` does, when it builds a config or model):
they work on numpy arrays and plain Python values, so they are tested in a single process in
seconds.

Then the loop and its entry points (these use MindSpore and ``models/``; docs/training.md):

- ``step.py``           ``TrainStep``: compiled forward+backward, gradient accumulation, dp
                        all-reduce, global-norm clipping, AdamW (written out, numpy-tested).
- ``pretrain.py``       ``python training/pretrain.py --config FILE key=value ...`` (or msrun).
- ``lora.py``           the ``lora`` section: LoRA adapters attached where the model is built.
- ``lora_stages.py``    LoRA on pipeline stages: per-stage adapters, one PEFT directory saved.
- ``evaluate.py``       validation loss / perplexity of a checkpoint; ``--tasks``: multiple-choice
                        and exact-match scores on a JSON Lines file (``eval_tasks.py``).
- ``generate.py``       text from a training checkpoint or a Hugging Face directory.
- ``export_hf.py``      ``python -m training.export_hf CKPT OUT_DIR``: a checkpoint as a HF directory.
"""
