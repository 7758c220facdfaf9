"""Chat data for fine-tuning (training/data/chat.py, training/data/sft.py), no model involved:
template rendering against hand-written strings (the default template and a Hugging Face style
``tokenizer_config.json`` one), the assistant mask, one clear error per bad line naming
``file:line``, packing into rows (positions restart, segment ids, labels -100 off the assistant
tokens), the cache, and ``--dry-run`` (in-process and through the CLI)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.multirank import REPO_ROOT
from training.data.chat import (ChatTemplate, encode_turns, load_template, read_conversations,
                                render_turns)
from training.data.sft import SFTRows, pack_rows
from training.errors import DataError

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]

# A ChatML-style template in the shape Hugging Face tokenizer_config.json files carry (written
# for this test): trim_blocks matters (the newline after a block tag goes, not after an
# expression).
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}\n"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_default_template_renders_the_documented_string():
    t = load_template(None, "<|endoftext|>")
    assert t.origin == "default"
    assert t.render(CONV) == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello."
                              "<|endoftext|>\n<|user|>\n2+2?\n<|assistant|>\n4<|endoftext|>\n")
    assert t.render(CONV[:2], add_generation_prompt=True) == \
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def test_tokenizer_config_template_is_used_with_its_special_tokens(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{{ bos_token }}" + CHATML,
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "<|im_end|>"}))
    t = load_template(tmp_path, "<|endoftext|>")
    assert t.origin == str(tmp_path / "tokenizer_config.json")
    assert t.special["bos_token"] == "<s>" and t.special["eos_token"] == "<|im_end|>"
    assert t.render(CONV[1:3]) == ("<s><|im_start|>user\nHi<|im_end|>\n"
                                   "<|im_start|>assistant\nHello.<|im_end|>\n")
    pieces = render_turns(t, CONV)
    assert [text for text, a in pieces if a] == ["Hello.<|im_end|>\n", "4<|im_end|>\n"]
    assert "".join(text for text, _ in pieces) == t.render(CONV)
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }}")  # newer HF layout wins
    t = load_template(tmp_path, "<|endoftext|>")
    assert t.origin == str(tmp_path / "chat_template.jinja") and t.render(CONV) == "<|im_end|>"


def test_generation_blocks_and_loop_controls_render():
    t = ChatTemplate("{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}"
                     "{% endif %}{% if m['role'] == 'assistant' %}{% generation %}"
                     "A: {{ m['content'] }}\n{% endgeneration %}{% else %}Q: {{ m['content'] }}\n"
                     "{% endif %}{% endfor %}", {})
    assert t.render(CONV) == "Q: Hi\nA: Hello.\nQ: 2+2?\nA: 4\n"
    assert [p for p, a in render_turns(t, CONV) if a] == ["A: Hello.\n", "A: 4\n"]


def test_template_sandbox_and_raise_exception():
    t = ChatTemplate("{{ raise_exception('only user turns') }}", {})
    with pytest.raises(DataError, match="only user turns"):
        t.render(CONV)
    t = ChatTemplate("{{ messages.__class__.__mro__ }}", {})  # the sandbox refuses internals
    with pytest.raises(DataError, match="chat template"):
        t.render(CONV)
    with pytest.raises(DataError, match="incremental"):  # assistant turns cannot be masked
        render_turns(ChatTemplate("{{ messages | length }}", {}), CONV)


def test_assistant_mask_covers_exactly_the_assistant_tokens():
    from training.data.tokenizer import train_bpe

    t = load_template(None, "<|endoftext|>")
    pieces = render_turns(t, CONV)
    tok = _bpe(tmp_text="".join(p for p, _ in pieces) * 5, train_bpe=train_bpe)
    ids, mask = encode_turns(tok, pieces)
    assert len(ids) == len(mask)
    kept = [tok.decode([i]) for i, m in zip(ids, mask) if m]
    assert "".join(kept) == "Hello.<|endoftext|>\n4<|endoftext|>\n"
    assert tok.decode(ids) == t.render(CONV)


def _bpe(tmp_text, train_bpe):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.txt"
        p.write_text(tmp_text)
        return train_bpe([p], 300)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ('{"text": "x"}', "needs 'messages' or 'prompt' and 'response'"),
    ('{"prompt": "x"}', "'response' must be a string"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}',
     "empty assistant turn"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user"}]}', "'role' and 'content'"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"prompt": "a", "response": "b"})
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value), str(err.value)


def test_prompt_response_records_become_conversations(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r", "system": "s"}) + "\n")
    assert read_conversations(path) == [[{"role": "system", "content": "s"},
                                         {"role": "user", "content": "p"},
                                         {"role": "assistant", "content": "r"}]]


def test_packing_positions_segments_and_labels():
    # three samples of 5, 4 and 6 tokens (4, 3 and 5 input positions); mask 1 = assistant
    samples = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([6, 7, 8, 9], [0, 0, 0, 1]),
               ([10, 11, 12, 13, 14, 15], [0, 1, 1, 0, 1, 1])]
    tokens = np.array(sum((s for s, _ in samples), []))
    mask = np.array(sum((m for _, m in samples), []), np.int8)
    offsets = np.cumsum([0] + [len(s) for s, _ in samples])
    assert pack_rows([4, 3, 5], 8, pack=True) == [[0, 1], [2]]
    assert pack_rows([4, 3, 5], 8, pack=False) == [[0], [1], [2]]
    rows = SFTRows(tokens, offsets, mask, pack_rows([4, 3, 5], 8, True), 8, pad_id=0)
    inputs, labels, pos, seg = rows.batch([0, 1])
    np.testing.assert_array_equal(inputs, [[1, 2, 3, 4, 6, 7, 8, 0], [10, 11, 12, 13, 14, 0, 0, 0]])
    np.testing.assert_array_equal(labels, [[-100, 3, 4, 5, -100, -100, 9, -100],
                                           [11, 12, -100, 14, 15, -100, -100, -100]])
    np.testing.assert_array_equal(pos, [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 0, 0]])
    np.testing.assert_array_equal(seg, [[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]])


def _sft_config(tmp_path, *extra):
    from training.config import load_config

    return load_config(str(REPO_ROOT / "configs" / "tiny_sft_demo.yaml"),
                       [f"data.cache_dir={tmp_path / 'cache'}", *extra])


def test_dry_run_shows_one_masked_sample_and_caches(tmp_path):
    import io

    from training.finetune import dry_run

    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"Say {w}.", "response": w} for w in ["yes", "no", "maybe"] * 8]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _sft_config(tmp_path, f"sft.data={path}", "training.global_batch_size=2",
                      "training.micro_batch_size=1", "data.valid_fraction=0")
    out = io.StringIO()
    text = dry_run(cfg, out)
    assert "[[<|user|>\nSay yes.\n<|assistant|>\n]]yes<|endoftext|>\n" in text, text
    assert "in the loss (assistant)" in text and "sft.pack=True" in text
    cached = list((tmp_path / "cache").glob("sft_chat_*/samples.npz"))
    assert len(cached) == 1
    before = cached[0].stat().st_mtime_ns
    out2 = io.StringIO()
    assert dry_run(cfg, out2) == text and "tokenizing" not in out2.getvalue()  # cache hit
    assert cached[0].stat().st_mtime_ns == before


def test_cli_dry_run_and_bad_data_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" +
                    json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    cmd = [sys.executable, "-m", "training.finetune", str(REPO_ROOT / "configs/tiny_sft_demo.yaml"),
           f"data.cache_dir={tmp_path / 'cache'}", f"logging.output_dir={tmp_path / 'out'}"]
    res = subprocess.run(cmd + [f"sft.data={path}", "--dry-run"], capture_output=True, text=True,
                         timeout=120, cwd=REPO_ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == (f"data error: {path}:2: message 0 has role 'robot'; expected "
                                  "one of system, user, assistant"), res.stderr
    res = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, timeout=120,
                         cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[[<|" in res.stdout and "in the loss (assistant)" in res.stdout
    assert not (tmp_path / "out").exists()  # a dry run trains nothing
    res = subprocess.run(cmd + ["sft.data=null", "--dry-run"], capture_output=True, text=True,
                         timeout=120, cwd=REPO_ROOT)
    assert res.returncode == 2 and res.stderr.startswith("config error: sft.data"), res.stderr


def test_sft_tokenizer_needs_the_templates_end_token(tmp_path):
    from training.config import ConfigError
    from training.data.tokenizer import train_bpe
    from training.finetune import parse_args

    data = REPO_ROOT / "configs" / "data" / "tiny_chat.jsonl"
    tok = train_bpe([data], 300)
    tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML,
                                                                "eos_token": "<|im_end|>"}))
    argv = ["--config", str(REPO_ROOT / "configs" / "tiny_sft_demo.yaml"), f"sft.data={data}",
            f"data.tokenizer={tmp_path / 'tokenizer.json'}"]
    assert parse_args(argv).data.tokenizer == str(tmp_path / "tokenizer.json")  # <|endoftext|>
    with pytest.raises(ConfigError, match=r"^data.tokenizer: .*'<\|im_end\|>'"):
        parse_args(argv + [f"sft.template_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="^sft.template_dir: "):
        parse_args(argv + [f"sft.template_dir={tmp_path / 'none'}"])
