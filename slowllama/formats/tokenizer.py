"""Tokenizers: one interface, three file formats, chosen by what the files hold.

- sentencepiece `tokenizer.model` (Llama 1 and 2, Meta format);
- tiktoken BPE `tokenizer.model` (Llama 3 and 3.1, Meta format): base64 token and rank per line;
- a Hugging Face folder's `tokenizer.json`, with its tokenizer_config.json, special_tokens_map.json
  and generation_config.json, encoded and decoded as transformers' AutoTokenizer does.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from abc import ABCMeta, abstractmethod
from pathlib import Path

from ..errors import ConfigError


class _OpensByContent(ABCMeta):
    # `Tokenizer(path)` keeps working for callers written before there were several backends.
    def __call__(cls, *args, **kwargs):
        if cls is Tokenizer:
            return load_tokenizer(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class Tokenizer(metaclass=_OpensByContent):
    """Text <-> token ids. `Tokenizer(path)` is `load_tokenizer(path)`.

    bos_id/eos_id may be None where the model has none; stop_ids are every id that ends
    generation; bos_token/eos_token/chat_template are what a chat template sees.
    """

    path: Path
    bos_id: int | None = None
    eos_id: int | None = None
    stop_ids: frozenset[int] = frozenset()
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None
    template_tokens: dict[str, str] = {}  # every named special token, as transformers passes them to templates

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int:
        """The id that fills padding: never a target and never attended to, so only its range matters."""
        return self.eos_id if self.eos_id is not None else 0

    @abstractmethod
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` with no BOS/EOS added, and each token's (start, end) character span."""
        raise ConfigError(f"{self.path}: this tokenizer cannot map tokens to characters (needed for chat data)")


class SentencePieceTokenizer(Tokenizer):
    """The sentencepiece tokenizer that ships with Llama 1 and 2 checkpoints."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{self.path}: not a sentencepiece model ({e})") from e
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.stop_ids = frozenset({self.eos_id})

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


# Meta's Llama 3 tokenizer: the pre-tokenizer pattern and 256 special tokens placed after the BPE ranks.
# The names are Llama 3.1's; 3.0 ships the same file and calls ids 4, 5, 8 and 10 reserved tokens.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_N_SPECIAL = 256
_LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL = _LLAMA3_NAMED + [f"<|reserved_special_token_{2 + i}|>"
                                  for i in range(LLAMA3_N_SPECIAL - len(_LLAMA3_NAMED))]
LLAMA3_STOP = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # as Meta's generator stops
# Meta's ChatFormat as a template: BOS, then per message a header, "\n\n", the stripped content and <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
                        "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
                        "{% endif %}")
# Meta encodes long texts in pieces: tiktoken's Rust side overflows its stack on very long runs.
_MAX_ENCODE_CHARS, _MAX_RUN_CHARS = 400_000, 25_000
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/=]+ [0-9]+")


def _meta_pieces(text: str):
    """(start, piece): `text` in 400k-character chunks, each cut where a whitespace or non-whitespace run
    passes 25k characters, as Meta's Tokenizer.encode cuts it."""
    for base in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[base: base + _MAX_ENCODE_CHARS]
        run, is_space, start = 0, chunk[:1].isspace(), 0
        for i, c in enumerate(chunk):
            if c.isspace() != is_space:
                run, is_space = 1, not is_space
            else:
                run += 1
                if run > _MAX_RUN_CHARS:
                    yield base + start, chunk[start:i]
                    start, run = i, 1
        yield base + start, chunk[start:]


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """{token bytes: rank} from a tiktoken BPE file (base64 token, space, rank per line)."""
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise ConfigError(f"{path}:{n}: expected a base64 token and a rank") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer.model, read with tiktoken, with Meta's chat format as its chat template.

    Special-token strings in the text encode as their special ids, as Hugging Face's copy of this
    tokenizer does; that is how a rendered chat gets its header and end-of-turn tokens.
    """

    def __init__(self, path: str | Path):
        import tiktoken

        self.path = Path(path)
        self.ranks = ranks = read_tiktoken_ranks(self.path)
        self.special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)}
        self.enc = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        self.bos_id, self.eos_id = self.special[self.bos_token], self.special[self.eos_token]
        self.stop_ids = frozenset(self.special[t] for t in LLAMA3_STOP)
        self.template_tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        self.chat_template = LLAMA3_CHAT_TEMPLATE

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [i for _, piece in _meta_pieces(text) for i in self.enc.encode(piece, allowed_special="all")]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, starts = [], []
        for base, piece in _meta_pieces(text):
            piece_ids = self.enc.encode(piece, allowed_special="all")
            decoded, piece_starts = self.enc.decode_with_offsets(piece_ids)
            if decoded != piece:  # only lone surrogates fail to round-trip
                raise ConfigError(f"{self.path}: text does not survive encode/decode, cannot place its tokens")
            ids += piece_ids
            starts += [base + s for s in piece_starts]
        return ids, list(zip(starts, starts[1:] + [len(text)]))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return value


def _token_text(value) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict
    return value.get("content") if isinstance(value, dict) else value


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer(Tokenizer):
    """A Hugging Face folder's tokenizer.json, encoding and decoding as AutoTokenizer.from_pretrained does.

    Follows transformers' generic fast tokenizer: the tokenizer.json pipeline as written (its post-processor
    alone decides BOS/EOS; transformers drops add_bos_token/add_eos_token when tokenizer.json exists), tokens
    from added_tokens_decoder and the named special tokens added when missing, stop ids from the model's files.
    """

    def __init__(self, path: str | Path):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        path = Path(path)  # the folder, or its tokenizer.json under any name
        tok_file = path / "tokenizer.json" if path.is_dir() else path
        self.path = tok_file.parent
        try:
            self.tk = Backend.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception with serde's message
            raise ConfigError(f"{tok_file}: not a tokenizers file ({e})") from e
        cfg = _read_json(self.path / "tokenizer_config.json")
        for key, value in _read_json(self.path / "special_tokens_map.json").items():
            cfg.setdefault(key, value)
        gen = _read_json(self.path / "generation_config.json")

        # Tokens the config declares but tokenizer.json lacks, in id order, then missing named special tokens.
        decl = cfg.get("added_tokens_decoder") or {}
        for _, t in sorted(((int(i), t) for i, t in decl.items()), key=lambda p: p[0]):
            if self.tk.token_to_id(t["content"]) is None:
                opts = {k: t[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in t}
                self.tk.add_tokens([AddedToken(t["content"], **opts)])
        self.template_tokens = {k: _token_text(cfg[k]) for k in _SPECIAL_KEYS if _token_text(cfg.get(k))}
        missing = [t for t in self.template_tokens.values() if self.tk.token_to_id(t) is None]
        self.tk.add_special_tokens(list(dict.fromkeys(missing)))

        self.bos_token = self.template_tokens.get("bos_token")
        self.eos_token = self.template_tokens.get("eos_token")
        self.bos_id = self.tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tk.token_to_id(self.eos_token) if self.eos_token else None
        self.tk.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
        # transformers skips the clean-up for BPE models: it would delete real spaces before punctuation
        self.clean_up = bool(cfg.get("clean_up_tokenization_spaces")) and type(self.tk.model).__name__ != "BPE"

        gen_eos = gen.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        if self.eos_id is None and gen_eos:
            self.eos_id = gen_eos[0]
        self.stop_ids = frozenset(gen_eos) | ({self.eos_id} if self.eos_id is not None else set())
        self.chat_template = _chat_template(self.path, cfg)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # bos=True means "what the tokenizer itself adds": AutoTokenizer(text).input_ids
        ids = self.tk.encode(text, add_special_tokens=bos).ids
        if eos and self.eos_id is not None and ids[-1:] != [self.eos_id]:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        text = self.tk.decode(list(ids), skip_special_tokens=False)
        if self.clean_up:  # transformers' clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]


def _chat_template(folder: Path, cfg: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or named ones: "default")."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: chat_template lists no template named \"default\"")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                          f"{{name, template}}")
    return template


def check_vocab(tokenizer: Tokenizer, top_id: int, vocab_size: int):
    """Refuse text that encodes to an id the model has no embedding row for (a tokenizer of another model)."""
    if top_id >= vocab_size:
        raise ConfigError(f"{tokenizer.path}: token id {top_id} is beyond the model's vocab_size {vocab_size}; "
                          f"is it this model's tokenizer?")


def meta_tokenizer_file(model_dir: Path) -> Path | None:
    """tokenizer.model in the folder or, as Meta's downloads keep it, beside the model folders."""
    return next((p for p in (model_dir / "tokenizer.model", model_dir.parent / "tokenizer.model") if p.is_file()),
                None)


def find_tokenizer_file(model_dir: Path) -> Path | None:
    """A Meta folder's (params.json) tokenizer.model, which its export carries; else tokenizer.json in the
    folder, else a tokenizer.model as Meta's lie."""
    if (model_dir / "params.json").is_file():
        return meta_tokenizer_file(model_dir)
    return model_dir / "tokenizer.json" if (model_dir / "tokenizer.json").is_file() else meta_tokenizer_file(model_dir)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model folder or a tokenizer file, its format told by content, not by name."""
    path = Path(path)
    if path.is_dir():
        found = find_tokenizer_file(path)
        if found is None:
            raise ConfigError(f"{path}: no tokenizer.json or tokenizer.model here (or tokenizer.model in its parent)")
        path = found
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read tokenizer ({e.strerror})") from e
    if head.lstrip().startswith(b"{"):
        return HFTokenizer(path)
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if _TIKTOKEN_LINE.fullmatch(first):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path)
