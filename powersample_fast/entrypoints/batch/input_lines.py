"""`run`'s input: the JSONL file's lines, and each line -> a Job or an error record for that line.

The file is UTF-8 JSONL; a UTF-8 byte-order mark is dropped, UTF-16/32 with a BOM are decoded, a file
with NUL bytes (binary, or UTF-16 without a BOM) is one error. Lines split on "\\n" only (a raw U+2028
inside a JSON string is not a line break); a line that is not valid UTF-8 gets an error record. A
line's keys: "id", "prompt" | "messages", "answer", and any SamplingParams field; a key close to one of
those (a typo: "mcmc_step", "alhpa") is an error, other keys (metadata: "subject", "level") are ignored.
"""
from __future__ import annotations

import codecs
import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, List, Optional, Union

from ...errors import ConfigError
from ..work_limits import check_work

LINE_KEYS = ("id", "prompt", "messages", "answer")
# names a user may write for a field (the CLI's flag names, OpenAI's): "did you mean" the field
ALIASES = {"steps": "mcmc_steps", "temperature": "proposal_temperature", "max_tokens": "max_new_tokens",
           "block": "block_size", "samples": "n"}
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


@dataclass
class Job:
    line: int
    id: Any
    ids: list
    params: Any
    answer: Any = None

    @property
    def prompt_index(self) -> int:
        """Keys the chains' seeds to the line's id, not its position or rank."""
        return int.from_bytes(hashlib.blake2b(str(self.id).encode(), digest_size=4).digest(), "little")

    def error(self, msg: str) -> dict:
        """An error record for this line; the engine's "prompt <seed key>" becomes the line's id."""
        msg = msg.replace(f"prompt {self.prompt_index} ", "the prompt ", 1) if msg.startswith("prompt ") else msg
        return error_record(self.line, msg.replace(f"prompt {self.prompt_index}", f"id {self.id!r}"), self.id)


def error_record(line: int, msg: str, id_: Any = None) -> dict:
    """{"line", "id" (when the line has a usable one), "error": "line N (id X): msg"}."""
    if isinstance(id_, (str, int)) and not isinstance(id_, bool):
        return {"line": line, "id": id_, "error": f"line {line} (id {id_!r}): {msg}"}
    return {"line": line, "error": f"line {line}: {msg}"}


MAX_INPUT_BYTES = 2**30  # 1 GiB of JSONL: ~1M problems with long prompts; beyond that, split the file


def read_lines(path) -> List[Union[str, ConfigError]]:
    """The input's lines (without "\\n" / "\\r\\n"): text, or a ConfigError for a line that is not UTF-8.
    Raises ConfigError (one line) for an unreadable or binary file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)  # bounded: /dev/urandom or a FIFO that never ends cannot hang the run
    except OSError as e:
        raise ConfigError(f"cannot read --input {path}: {e.strerror or e}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise ConfigError(f"--input {path} is over the {MAX_INPUT_BYTES:,}-byte limit (or never ends); split it into "
                          "several files and run each")
    enc = next((enc for bom, enc in _BOMS if data.startswith(bom)), None)
    if enc is None and b"\0" in data:
        raise ConfigError(f"--input {path} is not UTF-8 text (it has NUL bytes: a binary file, or UTF-16/32 without "
                          "a byte-order mark); give UTF-8 JSONL (convert with iconv -t utf-8)")
    if enc not in (None, "utf-8-sig"):
        try:
            data = data.decode(enc).encode("utf-8", "surrogatepass")
        except UnicodeError as e:
            raise ConfigError(f"--input {path} starts with a {enc.upper()} byte-order mark but is not {enc.upper()} "
                              f"({e.reason}); give UTF-8 JSONL") from None
    elif enc == "utf-8-sig":
        data = data[len(codecs.BOM_UTF8):]
    rows = data.split(b"\n")
    if rows and rows[-1] == b"":
        rows.pop()
    out: List[Union[str, ConfigError]] = []
    for raw in rows:
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            out.append(ConfigError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); "
                                   "the input must be UTF-8 JSONL"))
    return out


def check_keys(obj: dict, fields) -> None:
    """ConfigError for a key that looks like a typo of a line key or a parameter ("did you mean")."""
    known, typos = set(LINE_KEYS) | set(fields), []
    for k in obj:
        close = [] if k in known else [ALIASES[k]] if k in ALIASES else \
            difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.8)
        if close:
            typos.append((k, close[0]))
    if len(typos) == 1:
        raise ConfigError(f"unknown parameter {typos[0][0]!r}; did you mean {typos[0][1]!r}?")
    if typos:
        raise ConfigError("unknown parameters " + ", ".join(f"{k!r} (did you mean {c!r}?)" for k, c in typos))


def _check_text(x, where: str) -> None:
    """Strings in a prompt must be valid Unicode: JSON's "\\ud800" escapes give lone surrogates,
    which no tokenizer can encode."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"the {where} is not valid text (a lone surrogate U+{ord(x[e.start]):04X} at "
                              f"character {e.start})") from None
    elif isinstance(x, list):
        for v in x:
            _check_text(v, where)
    elif isinstance(x, dict):
        for v in x.values():
            _check_text(v, where)


def _encode(obj: dict, tokenizer, chat: Optional[bool]) -> list:
    _check_text(obj.get("prompt"), "prompt")
    _check_text(obj.get("messages"), "messages")
    try:
        if "messages" in obj:
            from ..openai.protocol import _encode_prompts

            return _encode_prompts(obj, True, tokenizer)[0]
        from ...prompts import normalize_prompts

        p = obj["prompt"]
        return normalize_prompts(p if isinstance(p, str) else [p], tokenizer, chat=chat)[0]  # ids: never templated
    except ValueError:
        raise
    except Exception as e:  # a tokenizer's own error for odd input: this line's error, not the run's
        raise ConfigError(f"cannot encode the prompt ({type(e).__name__}: {e})") from None


def parse_line(line: int, raw, defaults: dict, tokenizer, chat: Optional[bool], param_cls,
               allow_long: bool = False):
    """A Job, or an error record (dict) for a line that cannot run."""
    obj = None
    try:
        if isinstance(raw, ConfigError):
            raise raw
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"a line must be a JSON object (got {type(obj).__name__})")
        if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
            raise ConfigError("a line needs an \"id\" (a string or an integer)")
        names = {f.name for f in dataclasses.fields(param_cls)}
        check_keys(obj, names)
        if ("prompt" in obj) == ("messages" in obj):
            raise ConfigError("a line needs exactly one of \"prompt\" and \"messages\"")
        params = param_cls(**{**defaults, **{k: v for k, v in obj.items() if k in names}})
        check_work(params, 1, allow_long=allow_long, override="--allow-long")
        return Job(line, obj["id"], _encode(obj, tokenizer, chat), params, obj.get("answer"))
    except ValueError as e:  # ConfigError, json.JSONDecodeError
        return error_record(line, str(e), obj.get("id") if isinstance(obj, dict) else None)
