import json

import pytest

from cai import prompts as P
from cai.errors import InputError


def test_shipped_sets_sizes_and_categories():
    assert len(P.load("red-team").prompts) >= 140
    assert len(P.load("helpful").prompts) >= 95
    assert len(P.load("borderline").prompts) >= 45
    every = P.load("all")
    assert every.duplicates_dropped == 0
    assert {p.category for p in every.prompts} == {"red_team", "helpful", "borderline"}
    assert len(P.load("sample").prompts) == 12


def test_jsonl_prompt_and_messages_dedup_and_ids(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "Hello there"}, {"prompt": "hello   THERE"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}, {}]
    f.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n")
    ps = P.load(f)
    assert [p.text for p in ps.prompts] == ["Hello there", "Hi"]
    assert ps.duplicates_dropped == 1
    assert ps.prompts[0].id == P.prompt_id([{"role": "user", "content": "Hello there"}])
    assert P.load(f, limit=1).prompts[0].text == "Hello there"


def test_parquet_and_dataset_folder(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a?", "b?"]}), tmp_path / "p.parquet")
    assert [p.text for p in P.load(tmp_path / "p.parquet").prompts] == ["a?", "b?"]
    datasets.Dataset.from_dict({"prompt": ["x?", "y?", "x?"]}).save_to_disk(str(tmp_path / "ds"))
    ps = P.load(tmp_path / "ds")
    assert [p.text for p in ps.prompts] == ["x?", "y?"] and ps.duplicates_dropped == 1


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "ok"}\n{"prompt": "broken\n', r"p.jsonl:2: malformed JSON"),
    ('{"prompt": "ok"}\n{"text": "x"}\n', r"p.jsonl:2: needs a 'prompt'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n', r"p.jsonl:1: the last message"),
    ('{"prompt": "' + "x" * 5000 + '"}\n', r"p.jsonl:1: prompt is 5000 characters"),
    ("\n\n", r"the prompt set is empty"),
])
def test_bad_prompts_name_the_line(tmp_path, content, match):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(InputError, match=match):
        P.load(f)


def test_missing_prompts_file(tmp_path):
    with pytest.raises(InputError, match="no such prompts file"):
        P.load(tmp_path / "nope.jsonl")
