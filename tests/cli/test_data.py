"""Data pipeline: every dataset type, file format, assistant-only labels, packing, shards, reporting of bad rows."""

import json

import numpy as np
import pytest
from conftest import LLAMA3_SPECIALS, make_tokenizer_dir, write_jsonl

from surogate.cli.config import Config, DatasetConfig
from surogate.cli.data import IGNORE, prepare
from surogate.cli.data.chat import FALLBACK_TEMPLATES, ChatTemplate, TemplateRenderError
from surogate.cli.data.packing import pack
from surogate.cli.data.shards import open_shard
from surogate.cli.data.tokenizer import Tokenizer
from surogate.cli.errors import DataError, UserError


def _cfg(model, tmp_path, datasets, **kw):
    kw.setdefault("validation_split_ratio", 0.0)
    kw.setdefault("sequence_len", 128)
    return Config(model=str(model), output_dir=str(tmp_path / "out"), datasets=datasets, **kw)


def _run(cfg, command="sft"):
    log = []
    data = prepare(cfg, Tokenizer(cfg.model, cfg.chat_template), command, log=log.append)
    return data, "\n".join(log)


def _trained_texts(data, model):
    """The trained targets of every row, decoded, in row order."""
    tok = Tokenizer(model)
    labels = np.asarray(data.train.labels)
    return [tok.decode(row[row != IGNORE]) for row in labels]


def _all_trained(data, model):
    return "".join(_trained_texts(data, model))


def test_messages_and_sharegpt_train_only_assistant_turns(tmp_path, chatml_model):
    rows = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "A2"}]},
        {"conversations": [{"from": "human", "value": "Q3"}, {"from": "gpt", "value": "A3"}]},
    ]
    for type_ in ("messages", "sharegpt", "auto"):
        path = write_jsonl(tmp_path / f"{type_}.jsonl", rows)
        data, _ = _run(_cfg(chatml_model, tmp_path / type_, [DatasetConfig(path=str(path), type=type_)]))
        trained = _all_trained(data, chatml_model)
        for a in ("A1<|im_end|>\n", "A2<|im_end|>\n", "A3<|im_end|>\n"):
            assert a in trained
        for q in ("Q1", "Q2", "Q3", "be brief", "user"):
            assert q not in trained


def test_alpaca(tmp_path, chatml_model):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 3", "output": "5"},
                                              {"instruction": "Say hi", "input": "", "output": "hi"}])
    for type_ in ("alpaca", "auto"):
        data, _ = _run(_cfg(chatml_model, tmp_path / type_, [DatasetConfig(path=str(path), type=type_)]))
        assert _all_trained(data, chatml_model).replace("<|im_end|>\n", "|") in ("5|hi|", "hi|5|")
        text = Tokenizer(chatml_model).decode(np.asarray(data.train.input_ids)[0])
        assert "user\nAdd\n2 3<|im_end|>" in text and "user\nSay hi<|im_end|>" in text


def test_instruction_with_custom_fields_and_formats(tmp_path, chatml_model):
    path = write_jsonl(tmp_path / "i.jsonl", [{"task": "translate", "src": "chat", "lang": "en", "dst": "cat"},
                                              {"task": "greet", "src": "", "lang": "fr", "dst": "bonjour"}])
    ds = DatasetConfig(path=str(path), type="instruction", instruction_field="task", input_field="src",
                       output_field="dst", prompt_format="{instruction} ({lang}): {input}",
                       prompt_format_no_input="{instruction} in {lang}", system_prompt="SYS")
    data, _ = _run(_cfg(chatml_model, tmp_path, [ds]))
    text = Tokenizer(chatml_model).decode(np.asarray(data.train.input_ids)[0])
    assert "user\ntranslate (en): chat<|im_end|>" in text and "user\ngreet in fr<|im_end|>" in text
    assert text.count("<|im_start|>system\nSYS<|im_end|>") == 2
    assert sorted(_all_trained(data, chatml_model).split("<|im_end|>\n")[:2]) == ["bonjour", "cat"]


def test_conversation_with_property_mappings(tmp_path, chatml_model):
    path = write_jsonl(tmp_path / "c.jsonl", [{"dialog": [{"speaker": "user", "text": "hello"},
                                                          {"speaker": "assistant", "text": "world"}], "sys": "S"}])
    ds = DatasetConfig(path=str(path), type="conversation", messages_field="dialog", system_field="sys",
                       message_property_mappings={"role": "speaker", "content": "text"})
    data, _ = _run(_cfg(chatml_model, tmp_path, [ds]))
    assert _all_trained(data, chatml_model) == "world<|im_end|>\n"
    assert "<|im_start|>system\nS<|im_end|>" in Tokenizer(chatml_model).decode(np.asarray(data.train.input_ids)[0])


def test_text_trains_every_token_and_splits_long_documents(tmp_path, chatml_model):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 50}, {"text": "hello"}])
    data, log = _run(_cfg(chatml_model, tmp_path, [DatasetConfig(path=str(path), type="text")], sequence_len=32))
    tok = Tokenizer(chatml_model)
    # every token but each document's first is a target; the 51-token document became pieces of <= 32 tokens
    assert data.train.header["stats"]["datasets"][0]["counts"]["split_pieces"] == 2
    trained = _all_trained(data, chatml_model)
    assert trained.replace("<|endoftext|>", "").count("x") == 48 and "ello<|endoftext|>" in trained  # 50 x, 2 firsts
    assert tok.decode(np.asarray(data.train.input_ids).ravel()).count("hello<|endoftext|>") == 1


def test_auto_detects_question_answer_and_text(tmp_path, chatml_model):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    txt = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}])
    data, log = _run(_cfg(chatml_model, tmp_path, [DatasetConfig(path=str(qa)), DatasetConfig(path=str(txt))]))
    trained = _all_trained(data, chatml_model)
    assert "4<|im_end|>\n" in trained and "lain words<|endoftext|>" in trained and "2+2" not in trained
    assert "(response)" in log and "(text)" in log


def test_file_formats_json_parquet_txt_and_folder(tmp_path, chatml_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps({"data": [{"text": "from json"}]}))
    pq.write_table(pa.Table.from_pylist([{"text": "from parquet"}]), folder / "b.parquet")
    (folder / "c.txt").write_text("from txt one\n\nfrom txt two\n")
    (folder / "ignored.md").write_text("not data")
    data, log = _run(_cfg(chatml_model, tmp_path, [DatasetConfig(path=str(folder), type="text")]))
    text = Tokenizer(chatml_model).decode(np.asarray(data.train.input_ids).ravel())
    for s in ("from json", "from parquet", "from txt one", "from txt two"):
        assert s in text
    assert "not data" not in text and "4 rows" in log


def test_bad_rows_are_counted_and_reported_with_their_row(tmp_path, chatml_model):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "ok", "output": "fine"},
        "{not json",
        {"instruction": "no output"},
        {"instruction": "empty", "output": "  "},
        {"instruction": "long " * 40, "output": "x"},
        [1, 2],
    ])
    data, log = _run(_cfg(chatml_model, tmp_path, [DatasetConfig(path=str(path), type="alpaca")], sequence_len=64))
    counts = data.train.header["stats"]["datasets"][0]["counts"]
    assert counts == {"malformed": 3, "empty": 1, "too_long_deleted": 1}
    assert f"{path}:2: not valid JSON" in log and "6 rows -> 1 train" in log
    assert _all_trained(data, chatml_model) == "fine<|im_end|>\n"
    # truncate keeps the long one, cut to sequence_len, and says so
    data, log = _run(_cfg(chatml_model, tmp_path / "t", [DatasetConfig(path=str(path), type="alpaca")],
                          sequence_len=64, truncation_strategy="truncate"))
    assert data.train.header["stats"]["datasets"][0]["counts"]["truncated"] == 1 and "truncated" in log


def test_every_row_filtered_out_is_an_error_naming_the_type_mismatch(tmp_path, chatml_model):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "reply": "b"}] * 3)
    with pytest.raises(DataError) as e:
        _run(_cfg(chatml_model, tmp_path, [DatasetConfig(path=str(path), type="alpaca")]))
    msg = str(e.value)
    assert str(path) in msg and "every row was filtered out" in msg and "do not match type alpaca" in msg
    assert "['prompt', 'reply']" in msg


@pytest.mark.parametrize("content,error", [("", "empty"), (None, "not found")])
def test_empty_or_missing_file(tmp_path, chatml_model, content, error):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=error) as e:
        _run(_cfg(chatml_model, tmp_path, [DatasetConfig(path=str(path))]))
    assert str(path) in str(e.value)


def test_chat_data_needs_a_template(tmp_path):
    model = make_tokenizer_dir(tmp_path / "m")  # no chat_template
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}])
    with pytest.raises(UserError) as e:
        _run(_cfg(model, tmp_path, [DatasetConfig(path=str(path))]))
    assert "no chat template" in str(e.value) and "chat_template: chatml" in str(e.value)
    data, _ = _run(_cfg(model, tmp_path, [DatasetConfig(path=str(path))], chat_template="chatml"))
    assert _all_trained(data, model) == "a<|im_end|>\n"


def test_llama3_fallback_template(tmp_path):
    model = make_tokenizer_dir(tmp_path / "m", specials=LLAMA3_SPECIALS, eos="<|eot_id|>", bos="<|begin_of_text|>")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": " a "}]}])
    data, _ = _run(_cfg(model, tmp_path, [DatasetConfig(path=str(path))], chat_template="llama3"))
    text = Tokenizer(model).decode(np.asarray(data.train.input_ids)[0])
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>")
    assert _all_trained(data, model) == "a<|eot_id|>"


QWEN3_LIKE = (  # the official Qwen3 template's shape: only assistant turns after the last user turn show <think>
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("source", ["qwen3", "qwen3-like"])
def test_qwen3_templates_find_every_assistant_turn(tmp_path, source):
    template = FALLBACK_TEMPLATES["qwen3"] if source == "qwen3" else QWEN3_LIKE
    model = make_tokenizer_dir(tmp_path / "m", chat_template=template)
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "first"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "second"}]
    ids, trained = Tokenizer(model).encode_chat(messages)
    tok = Tokenizer(model)
    assert "first<|im_end|>" in tok.decode(ids[trained]) and "second<|im_end|>" in tok.decode(ids[trained])
    assert "q1" not in tok.decode(ids[trained]) and "q2" not in tok.decode(ids[trained])


def test_templates_render_in_a_sandbox():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateRenderError):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])
    refusing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TemplateRenderError, match="roles must alternate"):
        ChatTemplate(refusing).render([])


def test_packing_resets_positions_per_document_and_shifts_labels():
    docs = [(np.array([1, 2, 3], np.int32), np.array([0, 1, 1], bool)),
            (np.array([4, 5], np.int32), np.array([0, 1], bool)),
            (np.array([6, 7, 8, 9], np.int32), np.array([1, 1, 1, 1], bool))]
    ids, labels, pos, stats = pack(docs, seq=6, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert labels.tolist() == [[2, 3, -100, 5, -100, -100], [7, 8, 9, -100, -100, -100]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert stats == {"rows": 2, "tokens": 9, "trained_tokens": 6, "padding_tokens": 3}


def test_shards_are_reused_until_data_or_config_change(tmp_path, chatml_model):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(20)])
    cfg = _cfg(chatml_model, tmp_path, [DatasetConfig(path=str(path), type="text")])
    first, _ = _run(cfg)
    again, log = _run(cfg)
    assert not first.reused and again.reused and "reusing" in log
    np.testing.assert_array_equal(first.train.input_ids, again.train.input_ids)
    write_jsonl(path, [{"text": f"row {i}!"} for i in range(20)])
    assert not _run(cfg)[0].reused
    cfg.sequence_len = 64
    assert not _run(cfg)[0].reused
    # a damaged shard is never trusted
    shard = tmp_path / "out" / "tokenized" / "train.tok"
    shard.write_bytes(shard.read_bytes()[:-4])
    assert not _run(cfg)[0].reused
    assert open_shard(shard).n_rows >= 1


def test_validation_split_is_seeded_and_feeds_generation_prompts(tmp_path, chatml_model):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _cfg(chatml_model, tmp_path, [DatasetConfig(path=str(path))], validation_split_ratio=0.25)
    data, log = _run(cfg)
    assert "30 train + 10 eval" in log and data.eval is not None and len(data.eval_prompts) == 10
    answers = {p["answer"] for p in data.eval_prompts}
    trained = _all_trained(data, chatml_model)
    assert not any(f"{a}<|im_end|>" in trained for a in answers)  # held-out answers are never trained on
    cfg2 = _cfg(chatml_model, tmp_path / "again", [DatasetConfig(path=str(path))], validation_split_ratio=0.25)
    assert {p["answer"] for p in _run(cfg2)[0].eval_prompts} == answers


def test_split_and_subset_are_for_hub_datasets_only(tmp_path, chatml_model):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x y"}])
    with pytest.raises(DataError, match="applies to Hugging Face Hub datasets") as e:
        _run(_cfg(chatml_model, tmp_path, [DatasetConfig(path=str(path), type="text", split="test")]))
    assert "split" in str(e.value) and "samples" in str(e.value)
