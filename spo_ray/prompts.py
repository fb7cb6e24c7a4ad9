"""Prompt files and the prompt plan.

SPO trains on prompts only (the paper uses 4,000 Pick-a-Pic captions). This module loads prompt
files in several formats into a :class:`PromptSet`, optionally shortens prompts that exceed the
text encoder's context, and defines :class:`PromptPlan`: the seeded, resumable order in which
prompts are visited, cut into rounds. A prompt's id is its position in the loaded list, so
duplicates are kept (and only counted).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo_ray.rng import permutation

__all__ = [
    "SUPPORTED_SUFFIXES",
    "PromptFileError",
    "PromptPlan",
    "PromptSet",
    "Round",
    "default_prompt_file",
    "load_prompts",
    "truncate_prompts",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".json", ".jsonl", ".csv", ".parquet")
_KEYS: tuple[str, ...] = ("caption", "prompt")  # accepted object keys, in order of preference
_COLUMNS: tuple[str, ...] = ("prompt", "caption")  # accepted table columns, in order of preference
_BOM = "\ufeff"


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable or malformed; the message names the file and the problem."""


@dataclass
class PromptSet:
    """Prompts loaded from a file; a prompt's id is its index in ``prompts``."""

    prompts: list[str]
    source: str
    blank_lines_skipped: int = 0
    duplicates: int = 0
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def default_prompt_file() -> Path:
    """Path of the small demo prompt file shipped with the package."""
    return Path(__file__).resolve().parent / "data" / "demo_prompts.txt"


def load_prompts(
    path: str | Path,
    *,
    max_prompts: int | None = None,
    tokenizer_max_words: int | None = None,
) -> PromptSet:
    """Load prompts from a ``.txt``/``.json``/``.jsonl``/``.csv``/``.parquet`` file.

    Whitespace is stripped and blank prompts are skipped (and counted). Duplicates are kept and
    counted. ``max_prompts`` keeps the first N prompts. ``tokenizer_max_words``, if given, is a
    tokenizer-free cap: prompts with more whitespace-separated words are cut to that many words
    (counted in ``truncated``); use :func:`truncate_prompts` for an exact, tokenizer-based cut.
    Raises :class:`PromptFileError` on any problem with the file.
    """
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be a positive integer or None, got {max_prompts!r}")
    if tokenizer_max_words is not None and tokenizer_max_words < 1:
        raise ValueError(
            f"tokenizer_max_words must be a positive integer or None, got {tokenizer_max_words!r}"
        )

    p = Path(path)
    if not p.exists():
        raise PromptFileError(f"prompt file not found: {p}")
    if p.is_dir():
        raise PromptFileError(f"prompt file {p} is a directory, expected a file")
    if not p.is_file():  # a FIFO or a device would block the read or never end
        raise PromptFileError(f"prompt file {p} is not a regular file (a pipe or a device?)")
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise PromptFileError(
            f"prompt file {p} has unsupported suffix {p.suffix or '(none)'!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )

    if suffix == ".txt":
        raw = _read_txt(p)
    elif suffix == ".json":
        raw = _read_json(p)
    elif suffix == ".jsonl":
        raw = _read_jsonl(p)
    elif suffix == ".csv":
        raw = _read_csv(p)
    else:
        raw = _read_parquet(p)

    prompts: list[str] = []
    blanks = 0
    for text in raw:
        text = text.strip()
        if text:
            prompts.append(text)
        else:
            blanks += 1
    if not prompts:
        raise PromptFileError(f"prompt file {p} has no prompts")

    if max_prompts is not None:
        prompts = prompts[:max_prompts]

    truncated = 0
    if tokenizer_max_words is not None:
        for i, text in enumerate(prompts):
            words = text.split()
            if len(words) > tokenizer_max_words:
                prompts[i] = " ".join(words[:tokenizer_max_words])
                truncated += 1

    return PromptSet(
        prompts=prompts,
        source=str(p),
        blank_lines_skipped=blanks,
        duplicates=len(prompts) - len(set(prompts)),
        truncated=truncated,
    )


def _read_bytes(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise PromptFileError(f"prompt file {p} could not be read: {e.strerror or e}") from e


def _decode(p: Path, data: bytes) -> str:
    """Strict UTF-8 decode (a leading BOM is dropped); errors name the byte offset and line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PromptFileError(
            f"prompt file {p} is not valid UTF-8: undecodable byte 0x{data[e.start]:02x} "
            f"at byte offset {e.start} (line {line})"
        ) from e
    return text[1:] if text.startswith(_BOM) else text


def _lines(text: str) -> list[str]:
    """Split on newlines only (not on other Unicode separators); a final newline ends the last line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_txt(p: Path) -> list[str]:
    return _lines(_decode(p, _read_bytes(p)))


def _item_text(p: Path, item: Any, where: str) -> str:
    """A prompt from a JSON value: a string, or an object with a 'caption' or 'prompt' key."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in _KEYS:
            if key in item:
                value = item[key]
                if not isinstance(value, str):
                    raise PromptFileError(
                        f"prompt file {p}: {where} has a non-string {key!r} value "
                        f"({_json_type(value)}: {value!r:.60}), expected a string"
                    )
                return value
        keys = ", ".join(repr(k) for k in list(item)[:10]) or "none"
        raise PromptFileError(
            f"prompt file {p}: {where} is an object without a 'caption' or 'prompt' key (keys: {keys})"
        )
    raise PromptFileError(
        f"prompt file {p}: {where} is a non-string value ({_json_type(item)}: {item!r:.60}), "
        "expected a string or an object with a 'caption' or 'prompt' key"
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _read_json(p: Path) -> list[str]:
    text = _decode(p, _read_bytes(p))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptFileError(
            f"prompt file {p} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    if not isinstance(data, list):
        raise PromptFileError(
            f"prompt file {p}: expected a JSON array of strings or {{'caption': ...}} objects at top "
            f"level, got {_json_type(data)}"
        )
    return [_item_text(p, item, f"item at index {i}") for i, item in enumerate(data)]


def _read_jsonl(p: Path) -> list[str]:
    out: list[str] = []
    for lineno, line in enumerate(_lines(_decode(p, _read_bytes(p))), start=1):
        if not line.strip():
            out.append("")  # counted as a blank line
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(
                f"prompt file {p} is not valid JSON Lines: {e.msg} at line {lineno} column {e.colno}"
            ) from e
        out.append(_item_text(p, item, f"line {lineno}"))
    return out


def _column_texts(p: Path, table: Any) -> list[str]:
    """The 'prompt' (or 'caption') column of a pyarrow table, checked to hold only strings."""
    names = list(table.column_names)
    column = next((c for c in _COLUMNS if c in names), None)
    if column is None:
        found = ", ".join(repr(n) for n in names) or "none"
        raise PromptFileError(
            f"prompt file {p} has neither a 'prompt' nor a 'caption' column (columns found: {found})"
        )
    values = table.column(column).to_pylist()
    for row, value in enumerate(values):
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise PromptFileError(
                f"prompt file {p}: row {row} (0-based) of column {column!r} is a non-string value "
                f"({kind}: {value!r:.60}), expected a string"
            )
    return values


def _read_csv(p: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    data = _read_bytes(p)
    _decode(p, data)  # precise UTF-8 errors (byte offset, line) before pyarrow sees the bytes
    if data.startswith(_BOM.encode()):
        data = data[len(_BOM.encode()) :]
    # Force the prompt columns to strings so e.g. "1984" stays text and "" / "NA" are not nulls.
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in _COLUMNS}, strings_can_be_null=False)
    try:
        table = pacsv.read_csv(pa.BufferReader(data), convert_options=convert)
    except pa.ArrowException as e:
        raise PromptFileError(f"prompt file {p} could not be parsed as CSV: {e}") from e
    return _column_texts(p, table)


def _read_parquet(p: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as e:
        raise PromptFileError(f"prompt file {p} could not be read as Parquet: {e}") from e
    return _column_texts(p, table)


# --------------------------------------------------------------------------------------------
# Truncation to the text encoder's context
# --------------------------------------------------------------------------------------------


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _encoder_ids(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """The ids a text encoder sees: tokenized with truncation at ``max_length``, special tokens included."""
    return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def truncate_prompts(prompts: Sequence[str], tokenizer: Any, max_length: int = 77) -> tuple[list[str], int]:
    """Cut prompts whose tokenization (special tokens included) exceeds ``max_length`` at the token level.

    The reference truncates at the tokenizer (``truncation=True, max_length=77``): the text encoder
    sees the first ``max_length`` tokens, a part of a word included. A long prompt here becomes the
    shortest prefix of its text whose truncated tokenization is exactly those tokens: cut after the
    token at the limit or, when that token is a piece inside a word (a word's last piece tokenizes
    differently), a piece or so later, so that the encoders, which truncate at ``max_length``
    themselves, see the reference's tokens. Works with any Hugging Face tokenizer (character offsets
    where it has them, else decoded token prefixes). Returns the new list and the number of prompts
    over the limit.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    out: list[str] = []
    n_truncated = 0
    for prompt in prompts:
        if _n_tokens(tokenizer, prompt) <= max_length:
            out.append(prompt)
            continue
        out.append(_truncate_one(prompt, tokenizer, max_length))
        n_truncated += 1
    return out, n_truncated


def _truncate_one(prompt: str, tokenizer: Any, max_length: int) -> str:
    keep = max_length - _n_tokens(tokenizer, "")  # content tokens that fit beside the special ones
    if keep <= 0:
        return ""
    wanted = _encoder_ids(tokenizer, prompt, max_length)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ends = sorted({end for _, end in enc["offset_mapping"][keep - 1 :]})
        candidates = (prompt[:end].rstrip() for end in ends)
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        candidates = (tokenizer.decode(ids[:n], skip_special_tokens=True).strip() for n in range(keep, len(ids) + 1))
    for text in candidates:
        if _encoder_ids(tokenizer, text, max_length) == wanted:
            return text
    return prompt  # no shorter text gives the same tokens: the encoders truncate it themselves


# --------------------------------------------------------------------------------------------
# The prompt plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    """One round of training: ``prompt_ids`` from a single epoch; ``index`` is the global round number."""

    index: int
    epoch: int
    prompt_ids: list[int]


@dataclass(frozen=True)
class PromptPlan:
    """Seeded order of prompt visits: each epoch is a shuffle of all prompts cut into rounds.

    Everything is a pure function of (seed, epoch), so a run can resume at any global round
    index (its *position*) and see exactly the rounds it would have seen.
    """

    num_prompts: int
    epochs: int
    seed: int
    batch_size: int

    def __post_init__(self) -> None:
        for name in ("num_prompts", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PromptPlan.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"PromptPlan.seed must be an integer, got {self.seed!r}")

    @property
    def rounds_per_epoch(self) -> int:
        """Rounds in one epoch (the last may hold fewer than ``batch_size`` prompts)."""
        return math.ceil(self.num_prompts / self.batch_size)

    @property
    def num_rounds(self) -> int:
        """Total rounds over all epochs."""
        return self.epochs * self.rounds_per_epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """The shuffled prompt ids of ``epoch`` (a pure function of seed and epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        return permutation(self.num_prompts, "prompt_order", self.seed, epoch).tolist()

    def round_at(self, index: int) -> Round:
        """The round with global index ``index``."""
        if not 0 <= index < self.num_rounds:
            raise IndexError(f"round index {index} out of range [0, {self.num_rounds})")
        epoch, within = divmod(index, self.rounds_per_epoch)
        order = self.epoch_order(epoch)
        return Round(index, epoch, order[within * self.batch_size : (within + 1) * self.batch_size])

    def rounds(self) -> Iterator[Round]:
        """All rounds from the start."""
        return self.rounds_from(0)

    def rounds_from(self, position: int) -> Iterator[Round]:
        """Rounds from global round index ``position`` on (``num_rounds`` gives nothing)."""
        if not 0 <= position <= self.num_rounds:
            raise ValueError(f"position must be in [0, {self.num_rounds}], got {position}")
        return self._iter(position)

    def _iter(self, position: int) -> Iterator[Round]:
        rpe = self.rounds_per_epoch
        order: list[int] = []
        cached_epoch = -1
        for index in range(position, self.num_rounds):
            epoch, within = divmod(index, rpe)
            if epoch != cached_epoch:
                order, cached_epoch = self.epoch_order(epoch), epoch
            yield Round(index, epoch, order[within * self.batch_size : (within + 1) * self.batch_size])
