"""models.from_pretrained on broken Hugging Face directories: one ``models.LoadError`` naming the
file (and tensor) for each fault, raised before a model is built from bad files."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

import models  # noqa: E402
from models import LoadError  # noqa: E402
from models.safetensors_io import read_checkpoint, write_checkpoint  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hf"


def _copy(tmp_path, family: str = "llama") -> Path:
    target = tmp_path / family
    shutil.copytree(FIXTURES / family, target)
    return target


def _edit_header(file: Path, change) -> None:
    """Rewrite ``file``'s safetensors header with ``change(header)`` (data bytes kept)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def test_load_error_is_exported_and_a_value_error():
    assert issubclass(models.LoadError, ValueError)


def test_fewer_layers_than_the_checkpoint_is_refused_unless_not_strict(tmp_path):
    with pytest.raises(LoadError, match=r"llama: \d+ tensor\(s\) the model does not use: "
                                        r"'model\.layers\.1\..*num_hidden_layers=1.*strict=False"):
        models.from_pretrained(FIXTURES / "llama", num_hidden_layers=1)
    model = models.from_pretrained(FIXTURES / "llama", num_hidden_layers=1, strict=False)
    assert model.config.num_layers == 1


def test_unexpected_tensor_is_named(tmp_path):
    d = _copy(tmp_path)
    tensors = {k: v.load() for k, v in read_checkpoint(d).items()}
    tensors["model.extra_adapter.weight"] = np.zeros((2, 2), np.float32)
    write_checkpoint(d, tensors)
    with pytest.raises(LoadError, match=r"does not use: 'model\.extra_adapter\.weight'"):
        models.from_pretrained(d)


def test_missing_tensor_names_directory_and_tensor(tmp_path):
    d = _copy(tmp_path)
    tensors = {k: v.load() for k, v in read_checkpoint(d).items()}
    del tensors["model.norm.weight"]
    write_checkpoint(d, tensors)
    with pytest.raises(LoadError,
                       match=r"llama: checkpoint is missing tensor\(s\) 'model\.norm\.weight'"):
        models.from_pretrained(d)


def test_nan_and_inf_weights_are_named(tmp_path):
    d = _copy(tmp_path)
    tensors = {k: v.load() for k, v in read_checkpoint(d).items()}
    w = tensors["model.layers.0.mlp.down_proj.weight"].copy()
    w[0, 0], w[1, 1] = np.nan, np.inf
    tensors["model.layers.0.mlp.down_proj.weight"] = w
    write_checkpoint(d, tensors)
    with pytest.raises(LoadError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\."
                                        r"down_proj\.weight' holds 2 NaN/Inf"):
        models.from_pretrained(d)


def test_config_json_that_is_not_json_is_named(tmp_path):
    d = _copy(tmp_path)
    (d / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(LoadError, match=r"config\.json: not valid JSON"):
        models.from_pretrained(d)
    (d / "config.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(LoadError, match=r"config\.json: not valid JSON"):
        models.from_pretrained(d)


def test_config_json_missing_a_required_key_is_named(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"config\.json: missing required key 'hidden_size'"):
        models.from_pretrained(d)


def test_missing_config_json_is_named(tmp_path):
    d = _copy(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(LoadError, match=r"config\.json: missing"):
        models.from_pretrained(d)


def test_garbage_safetensors_header_is_named(tmp_path):
    d = _copy(tmp_path)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    f.write_bytes(raw[:8] + b"\x00garbage!" * (n // 9) + b"#" * (n % 9) + raw[8 + n:])
    with pytest.raises(LoadError, match=r"model\.safetensors: safetensors header is not valid"):
        models.from_pretrained(d)


def test_header_shape_that_does_not_match_its_bytes_is_named(tmp_path):
    d = _copy(tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"

    def widen(header):
        header[name]["shape"] = [header[name]["shape"][0] * 2, header[name]["shape"][1]]

    _edit_header(d / "model.safetensors", widen)
    with pytest.raises(LoadError, match=rf"model\.safetensors: tensor '{name}': shape \[\d+, \d+\] "
                                        r"of \w+ needs \d+ bytes"):
        models.from_pretrained(d)


def test_header_entry_without_fields_and_unknown_dtype_are_named(tmp_path):
    d = _copy(tmp_path)
    name = "model.norm.weight"
    _edit_header(d / "model.safetensors", lambda h: h[name].pop("data_offsets"))
    with pytest.raises(LoadError, match=rf"tensor '{name}': header entry .* needs dtype, shape"):
        models.from_pretrained(d)
    d = _copy(tmp_path / "second")
    _edit_header(d / "model.safetensors", lambda h: h[name].update(dtype="F8_E9"))
    with pytest.raises(LoadError, match=rf"tensor '{name}': unsupported dtype 'F8_E9'"):
        models.from_pretrained(d)


def test_shard_listed_in_the_index_but_missing_is_named(tmp_path):
    d = _copy(tmp_path, "qwen3")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(LoadError, match=r"model-00002-of-00003\.safetensors: listed in "
                                        r"model\.safetensors\.index\.json but missing"):
        models.from_pretrained(d)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(LoadError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        models.from_pretrained(d)
