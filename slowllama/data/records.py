"""Training records from the files people have: JSONL, a JSON array, Parquet or CSV, one record at a time.

A record's kind follows from its keys (a table's from its columns), by KINDS. slowllama's own kinds (text,
prompt/completion, messages) may share a file, as they always could; an Alpaca or ShareGPT file is one
dataset's export, so a record of another kind in it is refused as a sign of a wrong file. Alpaca and ShareGPT
records become messages, as LLaMA-Factory's AlpacaDatasetConverter and SharegptDatasetConverter make them:
Alpaca's user turn is the instruction and the non-empty input joined by one newline, its "system" a system
turn; ShareGPT's "human"/"gpt" (or "user"/"assistant") turns become user/assistant, a "system" turn may only
come first. The model's chat template then renders them as it renders messages records.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .chat import check_messages


@dataclass(frozen=True)
class Kind:
    name: str  # as the up-front line and the refusals say it
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    own: bool = True  # slowllama's own kinds may mix in one file

    def fits(self, keys) -> bool:
        return set(self.required) <= set(keys) <= {*self.required, *self.optional}


# The order is the order a table's columns are matched in: the most specific first, so that an Alpaca table
# with a "text" column (as tatsu-lab/alpaca has) reads as Alpaca.
KINDS = (
    Kind("messages", ("messages",)),
    Kind("ShareGPT", ("conversations",), ("system",), own=False),
    Kind("Alpaca", ("instruction", "output"), ("input", "system"), own=False),
    Kind("prompt/completion", ("prompt", "completion")),
    Kind("text", ("text",)),
)
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # the files read as records; any other is plain text
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
JSON_VALUED = ("messages", "conversations")  # a CSV cell holds these as JSON text


@dataclass(frozen=True)
class Where:
    """Where a record is, for a refusal: FILE:LINE in JSONL, FILE: record N elsewhere; a table's fields are
    its columns."""
    file: str
    n: int
    line: bool = False  # n is a JSONL line number
    table: bool = False

    def __str__(self) -> str:
        return f"{self.file}:{self.n}" if self.line else f"{self.file}: record {self.n}"

    def name(self, field: str) -> str:
        return f"column {field!r}" if self.table else repr(field)

    def bad(self, field: str, what: str) -> ConfigError:
        return ConfigError(f"{self}: expected {what} for {self.name(field)}")


def _string(rec: dict, name: str, where: Where, optional: bool = False) -> str:
    v = rec.get(name)
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise where.bad(name, "a string" + (" or nothing" if optional else ""))
    return v


def _sharegpt(rec: dict, where: Where) -> list[dict]:
    turns = rec["conversations"]
    if not isinstance(turns, list) or not turns:
        raise where.bad("conversations", "a non-empty list of {\"from\", \"value\"} turns")
    messages = [{"role": "system", "content": _string(rec, "system", where)}] if rec.get("system") is not None else []
    for i, t in enumerate(turns):
        if not (isinstance(t, dict) and set(t) == {"from", "value"} and isinstance(t["from"], str)
                and isinstance(t["value"], str)):
            raise where.bad("conversations", f'conversations[{i}] as {{"from": "...", "value": "..."}}')
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise where.bad("conversations", f"conversations[{i}][\"from\"] to be one of {', '.join(SHAREGPT_ROLES)}, "
                                             f"not {t['from']!r}")
        if role == "system" and (i or messages):
            raise where.bad("conversations", f"a system turn only first, not at conversations[{i}]")
        messages.append({"role": role, "content": t["value"]})
    return messages


def convert(kind: Kind, rec: dict, where: Where):
    """The record as windows.Examples encodes it: a text, a (prompt, completion) pair or a list of messages."""
    if kind.name == "text":
        return _string(rec, "text", where)
    if kind.name == "prompt/completion":
        return _string(rec, "prompt", where), _string(rec, "completion", where)
    if kind.name == "messages":
        check_messages(rec["messages"], str(where))  # here: a string in its place is no text record
        return rec["messages"]
    if kind.name == "ShareGPT":
        return _sharegpt(rec, where)
    system = _string(rec, "system", where, optional=True)
    query = "\n".join(s for s in (_string(rec, "instruction", where), _string(rec, "input", where, True)) if s)
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": query}, {"role": "assistant", "content": _string(rec, "output", where)}]


EXPECTED = "expected one of " + "; ".join(
    f"{k.name} {{{', '.join(map(repr, k.required))}{''.join(f', [{o!r}]' for o in k.optional)}}}" for k in KINDS)


class Records:
    """The records of one data file, converted, with where each is; `summary` says what was read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.counts: Counter[str] = Counter()
        self.first: tuple[Kind, Where] | None = None
        self.table = None  # (format, used columns, ignored columns) of a Parquet or CSV file

    def __iter__(self) -> Iterator[tuple[object, Where]]:
        suffix = self.path.suffix.lower()
        if suffix == ".parquet":
            yield from self._table("Parquet", *_parquet(self.path))
        elif suffix == ".csv":
            yield from self._table("CSV", *_csv(self.path))
        else:
            rows = _json_array(self.path) if suffix == ".json" else _jsonl(self.path)
            for rec, where in rows:
                kind = next((k for k in KINDS if isinstance(rec, dict) and k.fits(rec)), None)
                if kind is None:
                    pair = isinstance(rec, dict) and set(rec) == {"prompt", "chosen", "rejected"}
                    raise ConfigError(f"{where}: {EXPECTED} (optional keys in brackets)" + (
                        "; a prompt/chosen/rejected record is a preference pair: train on it with --method dpo, "
                        "ipo or orpo" if pair else ""))
                yield self._count(kind, rec, where)

    def _count(self, kind: Kind, rec: dict, where: Where):
        if self.first is None:
            self.first = kind, where
        elif kind is not self.first[0] and not (kind.own and self.first[0].own):
            raise ConfigError(f"{where}: a {kind.name} record in a file whose first record ({self.first[1]}) is "
                              f"{self.first[0].name}; one format per file (only text, prompt/completion and "
                              f"messages records may mix)")
        self.counts[kind.name] += 1
        return convert(kind, rec, where), where

    def _table(self, fmt: str, columns: list[str], rows):
        kind = next((k for k in KINDS if set(k.required) <= set(columns)), None)
        if kind is None:
            raise ConfigError(f"{self.path}: no column set of a known kind among {', '.join(columns) or 'none'}; "
                              f"{EXPECTED}")
        used = [c for c in columns if c in (*kind.required, *kind.optional)]
        self.table = fmt, used, [c for c in columns if c not in used]
        for n, rec in enumerate(rows(used), 1):
            where = Where(str(self.path), n, table=True)
            for name in JSON_VALUED:
                if isinstance(rec.get(name), str):  # a CSV cell, or a Parquet string column, of JSON
                    try:
                        rec[name] = json.loads(rec[name])
                    except ValueError as e:
                        raise ConfigError(f"{where}: {where.name(name)} is not valid JSON ({e})") from e
            yield self._count(kind, rec, where)

    @property
    def summary(self) -> str:
        """'120 Alpaca records from FILE', with a table's format and columns, or each kind's count if they mix."""
        total = sum(self.counts.values())
        if len(self.counts) == 1:
            text = f"{total} {next(iter(self.counts))} records from {self.path}"
        else:
            text = f"{total} records from {self.path} ({', '.join(f'{n} {k}' for k, n in self.counts.items())})"
        if self.table:
            fmt, used, ignored = self.table
            text += f" ({fmt}, columns {', '.join(used)}" + (f"; ignored: {', '.join(ignored)})" if ignored else ")")
        return text


def _open(path: Path, mode="rb", **kw):
    try:
        return open(path, mode, **kw)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read data file ({e.strerror})") from e


def _jsonl(path: Path) -> Iterator[tuple[object, Where]]:
    """One JSON value per non-blank line, read line by line: the file is never held whole."""
    offset = 0
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {offset + e.start})") from e
            offset += len(raw)
            if not line.strip():
                continue
            try:
                yield json.loads(line), Where(str(path), n, line=True)
            except ValueError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e})") from e


def _json_array(path: Path) -> Iterator[tuple[object, Where]]:
    """A JSON array of records, as Alpaca's and many ShareGPT files come: parsed whole, as json can only."""
    with _open(path) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from e
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON array of records (or use .jsonl, one record a line)")
    for n, rec in enumerate(data, 1):
        yield rec, Where(str(path), n)


PARQUET_BATCH = 1024  # rows decoded at a time: memory stays bounded by one batch of the file's text


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
        from pyarrow import ArrowException
    except ImportError as e:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install \"slowllama[parquet]\")") from e
    try:
        pf = pq.ParquetFile(path)
    except (ArrowException, OSError) as e:
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from e

    def rows(columns):
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
                yield from batch.to_pylist()
        except ArrowException as e:
            raise ConfigError(f"{path}: Parquet data unreadable ({e})") from e

    return pf.schema_arrow.names, rows


def _csv(path: Path):
    """A header row, then one record a row, read row by row (a quoted cell may span lines)."""
    # A long document in one cell is a record like any other: lift the module's 128 KiB cell limit.
    csv.field_size_limit(2**31 - 1)
    f = _open(path, "r", encoding="utf-8-sig", newline="")  # utf-8-sig: drop the BOM that spreadsheets write
    try:
        reader = csv.reader(f)
        header = next(reader, None)
    except (UnicodeDecodeError, csv.Error) as e:
        f.close()
        raise ConfigError(f"{path}: unreadable CSV header ({e})") from e
    if header is None:
        f.close()
        raise ConfigError(f"{path}: data file is empty")
    if len(set(header)) != len(header):
        f.close()
        raise ConfigError(f"{path}: the header names a column twice ({', '.join(header)})")

    def rows(columns):
        with f:
            n = 0
            try:
                for row in reader:
                    if not row:  # a blank line between rows
                        continue
                    n += 1
                    if len(row) != len(header):
                        raise ConfigError(f"{path}: record {n} has {len(row)} fields, the header {len(header)}")
                    rec = dict(zip(header, row))
                    yield {c: rec[c] for c in columns}
            except (UnicodeDecodeError, csv.Error) as e:
                raise ConfigError(f"{path}: record {n + 1}: unreadable CSV ({e})") from e

    return header, rows
