"""Tests for spo_ray.prompts: prompt file formats, errors, truncation and the prompt plan."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spo_ray.prompts import (
    PromptFileError,
    PromptPlan,
    PromptSet,
    Round,
    default_prompt_file,
    load_prompts,
    truncate_prompts,
)

# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def test_txt_strips_and_counts_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("  a red fox  \n\n   \na blue bird\r\n\ta red fox\n", encoding="utf-8")
    ps = load_prompts(f)
    assert isinstance(ps, PromptSet)
    assert ps.prompts == ["a red fox", "a blue bird", "a red fox"]
    assert ps.blank_lines_skipped == 2
    assert ps.duplicates == 1  # counted, but kept: prompt ids are positions
    assert ps.truncated == 0
    assert ps.source == str(f)
    assert len(ps) == 3


def test_txt_without_final_newline_and_bom(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffone\ntwo".encode())
    ps = load_prompts(f)
    assert ps.prompts == ["one", "two"]
    assert ps.blank_lines_skipped == 0


def test_txt_only_splits_on_newlines(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a\u2028b\nc\x0cd\n", encoding="utf-8")
    assert load_prompts(f).prompts == ["a\u2028b", "c\x0cd"]


def test_json_list_of_strings(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["a cat", " ", "a dog "]))
    ps = load_prompts(f)
    assert ps.prompts == ["a cat", "a dog"]
    assert ps.blank_lines_skipped == 1


def test_json_caption_objects(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    items = [{"caption": "a cat", "id": 1}, {"caption": "a dog"}, {"prompt": "a cow"}, "a hen"]
    f.write_text(json.dumps(items))
    assert load_prompts(f).prompts == ["a cat", "a dog", "a cow", "a hen"]


def test_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"caption": "a cat"}\n\n"a dog"\n{"prompt": "a cow", "x": 2}\n')
    ps = load_prompts(f)
    assert ps.prompts == ["a cat", "a dog", "a cow"]
    assert ps.blank_lines_skipped == 1


def test_csv_prompt_column(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text('id,prompt\n1,a cat\n2,"a dog, running"\n3,\n4,1984\n5,NA\n', encoding="utf-8")
    ps = load_prompts(f)
    assert ps.prompts == ["a cat", "a dog, running", "1984", "NA"]
    assert ps.blank_lines_skipped == 1


def test_csv_caption_column(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("caption\na cat\n")
    assert load_prompts(f).prompts == ["a cat"]


def test_parquet_caption_column(tmp_path: Path) -> None:
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a cat"], "score": [1, 2, 3]}), f)
    ps = load_prompts(f)
    assert ps.prompts == ["a cat", "a dog", "a cat"]
    assert ps.duplicates == 1


def test_parquet_prompt_column_preferred(tmp_path: Path) -> None:
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["c"], "prompt": ["p"]}), f)
    assert load_prompts(f).prompts == ["p"]


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    f = tmp_path / "P.TXT"
    f.write_text("a cat\n")
    assert load_prompts(str(f)).prompts == ["a cat"]


def test_max_prompts_keeps_first_n(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("\n".join(f"prompt {i}" for i in range(10)) + "\n")
    ps = load_prompts(f, max_prompts=4)
    assert ps.prompts == ["prompt 0", "prompt 1", "prompt 2", "prompt 3"]
    assert load_prompts(f, max_prompts=100).prompts == [f"prompt {i}" for i in range(10)]
    with pytest.raises(ValueError, match="max_prompts"):
        load_prompts(f, max_prompts=0)


def test_tokenizer_max_words(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("one two three four\nshort one\n")
    ps = load_prompts(f, tokenizer_max_words=3)
    assert ps.prompts == ["one two three", "short one"]
    assert ps.truncated == 1


def test_demo_file_loads() -> None:
    path = default_prompt_file()
    assert path.is_file()
    ps = load_prompts(path)
    assert 50 <= len(ps.prompts) <= 80
    assert ps.blank_lines_skipped == 0
    assert ps.duplicates == 0


# --------------------------------------------------------------------------------------------
# Errors: each message names the file and the problem
# --------------------------------------------------------------------------------------------


def _error(path: Path) -> str:
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert str(path) in msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "nope.txt"
    assert _error(f) == f"prompt file not found: {f}"


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir.txt"
    d.mkdir()
    assert "directory" in _error(d)


def test_unsupported_suffix(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("- a cat\n")
    msg = _error(f)
    assert "unsupported suffix '.yaml'" in msg
    for suffix in (".txt", ".json", ".jsonl", ".csv", ".parquet"):
        assert suffix in msg


@pytest.mark.parametrize("name", ["p.txt", "p.json", "p.jsonl", "p.csv"])
def test_not_utf8(tmp_path: Path, name: str) -> None:
    f = tmp_path / name
    body = {
        "p.txt": b"ok\nbad \xff here\n",
        "p.json": b'["ok",\n"bad \xff"]',
        "p.jsonl": b'"ok"\n"bad \xff"\n',
        "p.csv": b"prompt\nbad \xff\n",
    }[name]
    f.write_bytes(body)
    msg = _error(f)
    assert "not valid UTF-8" in msg
    offset = body.index(b"\xff")
    assert f"byte offset {offset}" in msg
    assert "line 2" in msg


def test_invalid_json(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text('[\n  "a cat",\n  "a dog"\n  "a cow"\n]')
    msg = _error(f)
    assert "not valid JSON" in msg
    assert "line 4 column 3" in msg


def test_json_dict_at_top_level(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"caption": "a cat"}))
    msg = _error(f)
    assert "top level" in msg and "object" in msg


def test_json_object_without_caption(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["a cat", {"text": "a dog"}]))
    msg = _error(f)
    assert "index 1" in msg
    assert "without a 'caption' or 'prompt' key" in msg
    assert "'text'" in msg


def test_json_non_string_values(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["a cat", 3]))
    msg = _error(f)
    assert "index 1" in msg and "non-string" in msg

    f.write_text(json.dumps([{"caption": None}]))
    msg = _error(f)
    assert "index 0" in msg and "non-string 'caption'" in msg


def test_jsonl_invalid_line(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('"a cat"\n{"caption": "a dog"\n')
    msg = _error(f)
    assert "not valid JSON Lines" in msg and "line 2" in msg


def test_jsonl_bad_structure(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('"a cat"\n\n{"text": "a dog"}\n')
    msg = _error(f)
    assert "line 3" in msg and "without a 'caption' or 'prompt' key" in msg

    f.write_text('"a cat"\n[1, 2]\n')
    msg = _error(f)
    assert "line 2" in msg and "non-string" in msg


def test_csv_without_prompt_column(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("id,text\n1,a cat\n")
    msg = _error(f)
    assert "neither a 'prompt' nor a 'caption' column" in msg
    assert "'id', 'text'" in msg


def test_csv_malformed(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("prompt,x\na cat\n")
    assert "could not be parsed as CSV" in _error(f)


def test_parquet_without_prompt_column(tmp_path: Path) -> None:
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a cat"]}), f)
    msg = _error(f)
    assert "neither a 'prompt' nor a 'caption' column" in msg and "'text'" in msg


def test_parquet_non_string_values(tmp_path: Path) -> None:
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": [1, 2]}), f)
    msg = _error(f)
    assert "row 0" in msg and "non-string" in msg

    pq.write_table(pa.table({"caption": ["a cat", None]}), f)
    msg = _error(f)
    assert "row 1" in msg and "null" in msg


def test_parquet_corrupt(tmp_path: Path) -> None:
    f = tmp_path / "p.parquet"
    f.write_bytes(b"not a parquet file")
    assert "Parquet" in _error(f)


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("p.txt", "\n  \n\n"),
        ("p.txt", ""),
        ("p.json", "[]"),
        ("p.json", '["", " "]'),
        ("p.jsonl", "\n"),
        ("p.csv", "prompt\n\n"),
    ],
)
def test_no_prompts(tmp_path: Path, name: str, body: str) -> None:
    f = tmp_path / name
    f.write_text(body)
    assert _error(f) == f"prompt file {f} has no prompts"


# --------------------------------------------------------------------------------------------
# Truncation with tiny offline tokenizers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def word_tokenizer():
    """A word-level fast tokenizer: every whitespace-separated word is one token, plus BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<bos>": 1, "<eos>": 2}
    for w in "a red fox in the snow".split():
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<bos>", eos_token="<eos>"
    )


@pytest.fixture
def clip_tokenizer(tmp_path: Path):
    """A CLIP BPE tokenizer with a minimal vocabulary (byte characters plus two merges)."""
    from transformers import CLIPTokenizer

    from spo_ray.tiny import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    d = tmp_path / "clip_tok"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer.from_pretrained(d)


def _encoder_ids(tokenizer, text: str, max_length: int) -> list[int]:
    """What the reference's text encoder sees: the tokenizer's own truncation at max_length."""
    return tokenizer(text, truncation=True, max_length=max_length).input_ids


def test_truncate_word_level(word_tokenizer) -> None:
    assert len(word_tokenizer("a red fox").input_ids) == 5
    prompts = ["a red fox in the snow", "a red", "a red fox", "abracadabra"]
    out, n = truncate_prompts(prompts, word_tokenizer, max_length=5)
    assert out == ["a red fox", "a red", "a red fox", "abracadabra"]
    assert n == 1
    for p in out:
        assert len(word_tokenizer(p).input_ids) <= 5


def test_truncate_nothing_to_do(word_tokenizer) -> None:
    prompts = ["a red fox", "snow"]
    out, n = truncate_prompts(prompts, word_tokenizer)
    assert out == prompts and n == 0


def test_truncate_clip_bpe_at_the_token_limit(clip_tokenizer) -> None:
    # "a red fox" -> <sot> a</w> red</w> f o x</w> <eot>: 7 tokens; 6 keep <sot> a red f o <eot>.
    assert len(clip_tokenizer("a red fox").input_ids) == 7
    prompts = ["a red fox in snow", "a red", "a red in snow", "abcdefghijklmnop", "A  Red, in snow"]
    out, n = truncate_prompts(prompts, clip_tokenizer, max_length=6)
    assert n == 4
    # Cut at the token limit: the limit falls inside "fox", whose pieces f, o are what the reference's
    # encoder sees; "a red fo" would end in o</w>, so one more piece is kept and the encoder cuts it.
    assert out[0] == "a red fox"
    assert out[1] == "a red"
    assert out[2] == "a red in"  # a</w> red</w> i n</w>: the limit ends a word, the text fits exactly
    assert len(clip_tokenizer(out[2]).input_ids) == 6
    assert out[3] == "abcde"  # a b c d, then e</w>: "abcd" would end in d</w>
    assert out[4] == "A  Red, in"  # the original text is kept (case, spacing); the limit ends inside "in"
    for prompt, cut in zip(prompts, out, strict=True):
        assert _encoder_ids(clip_tokenizer, cut, 6) == _encoder_ids(clip_tokenizer, prompt, 6)
        assert len(cut) <= len(prompt)
    # the old word-boundary cut lost tokens the reference's encoder sees
    assert _encoder_ids(clip_tokenizer, "a red", 6) != _encoder_ids(clip_tokenizer, prompts[0], 6)


def test_truncate_at_the_real_limit_with_a_slow_tokenizer_too(tmp_path: Path) -> None:
    """77 tokens, special ones included, with the tiny pipeline's CLIP tokenizer (fast: offsets) and its
    python twin (slow: decoded prefixes): the encoder sees the first 77 tokens, as in the reference."""
    from transformers import CLIPTokenizer

    from spo_ray.tiny import write_clip_tokenizer_files

    path = write_clip_tokenizer_files(tmp_path / "tok")
    fast = CLIPTokenizer.from_pretrained(path)
    long = " ".join(["a red fox jumping over the lazy dog,"] * 12)
    assert len(fast(long).input_ids) > 77
    cut, n = truncate_prompts([long], fast, max_length=fast.model_max_length)
    assert n == 1 and len(cut[0]) < len(long) and long.startswith(cut[0])
    assert _encoder_ids(fast, cut[0], 77) == _encoder_ids(fast, long, 77) and len(_encoder_ids(fast, long, 77)) == 77
    assert len(fast(cut[0]).input_ids) - 77 <= 1  # at most one piece beyond the limit
    # A tokenizer without character offsets (a python "slow" one) takes the decoded-prefix path.
    slow = _NoOffsets(fast)
    cut_slow, n_slow = truncate_prompts([long], slow, max_length=77)
    assert n_slow == 1 and _encoder_ids(fast, cut_slow[0], 77) == _encoder_ids(fast, long, 77)


class _NoOffsets:
    """The tiny CLIP tokenizer seen through the interface of one without offsets (``is_fast`` False):
    transformers 5 ships no python CLIP tokenizer to test that path with."""

    is_fast = False

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tokenizer(text, **kwargs)

    def decode(self, ids, **kwargs):
        return self._tokenizer.decode(ids, **kwargs)


# --------------------------------------------------------------------------------------------
# PromptPlan
# --------------------------------------------------------------------------------------------


def test_epoch_order_is_deterministic() -> None:
    plan = PromptPlan(num_prompts=50, epochs=3, seed=7, batch_size=8)
    again = PromptPlan(num_prompts=50, epochs=3, seed=7, batch_size=8)
    assert plan.epoch_order(0) == again.epoch_order(0)
    assert plan.epoch_order(1) == again.epoch_order(1)
    assert sorted(plan.epoch_order(0)) == list(range(50))
    assert plan.epoch_order(0) != plan.epoch_order(1)
    other_seed = PromptPlan(num_prompts=50, epochs=3, seed=8, batch_size=8)
    assert plan.epoch_order(0) != other_seed.epoch_order(0)
    # The order does not depend on the batch size or on how many epochs are planned.
    assert plan.epoch_order(2) == PromptPlan(num_prompts=50, epochs=5, seed=7, batch_size=3).epoch_order(2)
    assert all(isinstance(i, int) for i in plan.epoch_order(0))


def test_rounds_cover_every_prompt_once_per_epoch() -> None:
    plan = PromptPlan(num_prompts=10, epochs=3, seed=0, batch_size=4)
    assert plan.rounds_per_epoch == 3
    assert plan.num_rounds == 9
    rounds = list(plan.rounds())
    assert [r.index for r in rounds] == list(range(9))
    assert [len(r.prompt_ids) for r in rounds] == [4, 4, 2] * 3  # no mixing of epochs
    for epoch in range(3):
        in_epoch = [r for r in rounds if r.epoch == epoch]
        ids = [i for r in in_epoch for i in r.prompt_ids]
        assert ids == plan.epoch_order(epoch)
        assert sorted(ids) == list(range(10))
    assert all(isinstance(r, Round) for r in rounds)


def test_rounds_exact_batches() -> None:
    plan = PromptPlan(num_prompts=8, epochs=2, seed=3, batch_size=4)
    rounds = list(plan.rounds())
    assert plan.num_rounds == len(rounds) == 4
    assert [r.epoch for r in rounds] == [0, 0, 1, 1]
    assert all(len(r.prompt_ids) == 4 for r in rounds)


def test_rounds_from_resumes() -> None:
    plan = PromptPlan(num_prompts=13, epochs=3, seed=11, batch_size=5)
    full = list(plan.rounds())
    for p in range(plan.num_rounds + 1):
        assert list(plan.rounds_from(p)) == full[p:]
        if p < plan.num_rounds:
            assert plan.round_at(p) == full[p]
    with pytest.raises(ValueError):
        plan.rounds_from(-1)
    with pytest.raises(ValueError):
        plan.rounds_from(plan.num_rounds + 1)
    with pytest.raises(IndexError):
        plan.round_at(plan.num_rounds)


def test_plan_is_frozen_and_validated() -> None:
    plan = PromptPlan(num_prompts=4, epochs=1, seed=0, batch_size=2)
    with pytest.raises(AttributeError):
        plan.seed = 1  # type: ignore[misc]
    for kwargs in (
        {"num_prompts": 0, "epochs": 1, "seed": 0, "batch_size": 1},
        {"num_prompts": 1, "epochs": 0, "seed": 0, "batch_size": 1},
        {"num_prompts": 1, "epochs": 1, "seed": 0, "batch_size": 0},
    ):
        with pytest.raises(ValueError):
            PromptPlan(**kwargs)


def test_plan_over_loaded_prompts() -> None:
    ps = load_prompts(default_prompt_file(), max_prompts=20)
    plan = PromptPlan(num_prompts=len(ps.prompts), epochs=2, seed=42, batch_size=6)
    seen = [ps.prompts[i] for r in plan.rounds() if r.epoch == 0 for i in r.prompt_ids]
    assert sorted(seen) == sorted(ps.prompts)
