"""Text tokenizers (character, byte, SentencePiece, byte-level BPE) with one encode/decode/save/load
interface. Byte-level BPE is Hugging Face's `tokenizers` library: trained here on a corpus, or
any `tokenizer.json` a user brings (GPT-2's, for example)."""

from __future__ import annotations

import abc
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
BPE_MODEL = "tokenizer_bpe.json"  # Hugging Face's tokenizer.json, beside our own tokenizer.json
TOKENIZER_KINDS = ("char", "byte", "sentencepiece", "bpe")
END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator, added to the BPE vocabularies we train
DEFAULT_BPE_VOCAB_SIZE = 4096
SENTENCEPIECE_MODEL_TYPES = ("bpe", "unigram")
DEFAULT_SENTENCEPIECE_VOCAB_SIZE = 1024
_FORMAT_VERSION = 1
# SentencePiece skips training sentences longer than max_sentence_length bytes; long lines are cut
# into chunks of this many characters (at most 4 UTF-8 bytes each) to stay below it.
_SP_CHUNK_CHARS = 4096
_SP_MAX_SENTENCE_BYTES = 4 * _SP_CHUNK_CHARS
_OOV_SHOWN = 10


def _as_id_array(ids: Any) -> np.ndarray:
    """Converts token ids (list, NumPy or JAX array, scalar) to a 1-D int64 NumPy array."""
    array = np.asarray(ids)
    if array.ndim > 1:
        raise ValueError(f"decode expects a 1-D sequence of token ids, got shape {array.shape}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"Token ids must be integers, got dtype {array.dtype}.")
    return array.reshape(-1).astype(np.int64)


def _check_id_range(ids: np.ndarray, vocab_size: int) -> None:
    """Raises ValueError if any id is outside [0, vocab_size)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(
            f"Token ids must be in [0, {vocab_size}); got {bad[:_OOV_SHOWN].tolist()}"
            + (" ..." if bad.size > _OOV_SHOWN else "")
        )


def check_text(text: str) -> str:
    """Returns `text` if every tokenizer can encode it; ValueError naming the first lone
    surrogate (U+D800-U+DFFF: valid in a JSON string, not in Unicode text) otherwise, so that
    every tokenizer refuses such text the same way."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"Text is not valid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at "
            f"character {e.start}. Send text whose surrogates come in pairs (or as the "
            "character itself)."
        ) from None
    return text


class Tokenizer(abc.ABC):
    """Common interface: vocab_size, encode(text) -> int32 ids, decode(ids) -> text, save(dir)."""

    kind: ClassVar[str]
    # What one token is, for bits-per-unit metrics: 'char', 'byte' or (subwords) 'token'.
    unit: ClassVar[str] = "token"

    @property
    def eot_id(self) -> int | None:
        """The end-of-text token that separates documents, or None if the vocabulary has none."""
        return None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Returns the number of token ids (ids are in [0, vocab_size))."""

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Returns the token ids of text as a 1-D int32 array."""

    @abc.abstractmethod
    def decode(self, ids: Any) -> str:
        """Returns the text of a 1-D sequence of token ids."""

    @abc.abstractmethod
    def _config(self) -> dict[str, Any]:
        """Returns the JSON-serialisable state written to tokenizer.json (besides kind)."""

    def save(self, directory: str) -> None:
        """Writes tokenizer.json (and any model file) to directory, creating it if needed."""
        os.makedirs(directory, exist_ok=True)
        config = {"kind": self.kind, "format_version": _FORMAT_VERSION, **self._config()}
        with open(os.path.join(directory, TOKENIZER_JSON), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=1)
            f.write("\n")

    def __eq__(self, other: object) -> bool:
        """Same kind and same mapping between text and ids (e.g. the same character list)."""
        return type(self) is type(other) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self._identity())))

    def _identity(self) -> Any:
        """What decides the mapping between text and ids."""
        return self._config()

    def describe(self) -> str:
        """A short description for messages: kind, size and (for characters) the vocabulary."""
        return f"{self.kind} tokenizer of {self.vocab_size} tokens"

    def __repr__(self) -> str:
        """Returns e.g. CharTokenizer(vocab_size=65)."""
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """Character-level tokenizer with a fixed vocabulary (nanoGPT's shakespeare_char scheme)."""

    kind = "char"
    unit = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        """Builds the tokenizer whose id i is chars[i]; chars must be distinct single characters."""
        chars = list(chars)
        if not chars:
            raise ValueError("A character vocabulary needs at least one character.")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("Every vocabulary entry must be a single character.")
        if len(set(chars)) != len(chars):
            raise ValueError("The character vocabulary contains duplicates.")
        self.itos: dict[int, str] = dict(enumerate(chars))
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(chars)}
        self._chars = "".join(chars)
        # Vectorised lookup: sorted code points and the id of each.
        codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        order = np.argsort(codepoints)
        self._sorted_codepoints = codepoints[order]
        self._sorted_ids = order.astype(np.int32)
        self._itos_array = np.array(chars, dtype="<U1")

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Builds the vocabulary from the sorted set of characters of text (as nanoGPT does)."""
        if not text:
            raise ValueError("Cannot build a character vocabulary from empty text.")
        return cls(sorted(set(text)))

    @property
    def chars(self) -> str:
        """Returns the vocabulary as one string, in id order."""
        return self._chars

    @property
    def vocab_size(self) -> int:
        """Returns the number of characters in the vocabulary."""
        return len(self.itos)

    def encode(self, text: str) -> np.ndarray:
        """Returns one id per character; raises ValueError on characters outside the vocabulary."""
        codepoints = np.frombuffer(check_text(text).encode("utf-32-le"), dtype=np.uint32)
        pos = np.searchsorted(self._sorted_codepoints, codepoints)
        pos = np.minimum(pos, len(self._sorted_codepoints) - 1)
        known = self._sorted_codepoints[pos] == codepoints
        if not known.all():
            unknown = list(dict.fromkeys(chr(c) for c in codepoints[~known]))
            shown = ", ".join(repr(c) for c in unknown[:_OOV_SHOWN])
            more = f" and {len(unknown) - _OOV_SHOWN} more" if len(unknown) > _OOV_SHOWN else ""
            raise ValueError(
                f"Text contains {len(unknown)} character(s) outside the {self.vocab_size}-"
                f"character vocabulary: {shown}{more}. The character vocabulary comes from the "
                f"training corpus; use a 'byte' or 'sentencepiece' tokenizer for arbitrary text, "
                f"or build the vocabulary from a corpus that contains these characters."
            )
        return self._sorted_ids[pos]

    def decode(self, ids: Any) -> str:
        """Returns the characters of ids joined into a string."""
        ids = _as_id_array(ids)
        _check_id_range(ids, self.vocab_size)
        return "".join(self._itos_array[ids].tolist())

    def _config(self) -> dict[str, Any]:
        """Returns the vocabulary, in id order."""
        return {"chars": self._chars}

    def describe(self) -> str:
        """E.g. "char tokenizer of 3 tokens 'abc'" (long vocabularies shortened)."""
        chars = self._chars if len(self._chars) <= 40 else self._chars[:37] + "..."
        return f"char tokenizer of {self.vocab_size} tokens {chars!r}"


class ByteTokenizer(Tokenizer):
    """UTF-8 byte tokenizer: 256 ids, encodes any text; decoding replaces invalid UTF-8."""

    kind = "byte"
    unit = "byte"

    @property
    def vocab_size(self) -> int:
        """Returns 256."""
        return 256

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of text as int32 ids."""
        return np.frombuffer(check_text(text).encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        """Returns the UTF-8 decoding of the bytes ids (invalid sequences become U+FFFD)."""
        ids = _as_id_array(ids)
        _check_id_range(ids, self.vocab_size)
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def _config(self) -> dict[str, Any]:
        """Returns no state (the byte vocabulary is fixed)."""
        return {}


def _training_sentences(text: str) -> Iterator[str]:
    """Yields the lines of text, long ones cut into chunks SentencePiece will not skip."""
    for line in text.split("\n"):
        for start in range(0, max(len(line), 1), _SP_CHUNK_CHARS):
            chunk = line[start : start + _SP_CHUNK_CHARS]
            if chunk:
                yield chunk


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece (BPE or unigram) subword tokenizer with byte fallback and exact round trips.

    Trained with identity normalisation, no dummy prefix and whitespace kept, so decode(encode(s))
    == s for any s that does not contain U+2581 ('▁', SentencePiece's internal space marker).
    Newline is a dedicated token; characters unseen in training are encoded as UTF-8 bytes.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes) -> None:
        """Wraps a serialised SentencePiece model."""
        import sentencepiece as spm

        self._model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int = DEFAULT_SENTENCEPIECE_VOCAB_SIZE,
        model_type: str = "bpe",
        workdir: str | None = None,
    ) -> SentencePieceTokenizer:
        """Trains a model on text offline; if workdir is given the tokenizer is also saved there."""
        import sentencepiece as spm

        if model_type not in SENTENCEPIECE_MODEL_TYPES:
            raise ValueError(
                f"Unknown SentencePiece model_type {model_type!r}; choose one of "
                f"{', '.join(SENTENCEPIECE_MODEL_TYPES)}."
            )
        if not text:
            raise ValueError("Cannot train a SentencePiece model on empty text.")
        # Always included: 256 byte-fallback pieces, <unk>, <s>, </s>, the newline symbol, and
        # (character_coverage=1.0) every other character of the text.
        min_vocab = 256 + 4 + len(set(text) - {"\n"})
        if vocab_size <= min_vocab:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for a byte-fallback SentencePiece model of "
                f"this text: 256 byte pieces, 4 special pieces and its {min_vocab - 260} distinct "
                f"characters are always included; use more than {min_vocab}."
            )
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(text),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                character_coverage=1.0,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                user_defined_symbols=["\n"],
                max_sentence_length=_SP_MAX_SENTENCE_BYTES,
                hard_vocab_limit=model_type == "bpe",
                num_threads=max(1, os.cpu_count() or 1),
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(
                f"SentencePiece training ({model_type}, vocab_size={vocab_size}) failed on "
                f"{len(text)} characters of text: {e}. A smaller vocab_size or more text helps."
            ) from e
        tokenizer = cls(model.getvalue())
        if workdir is not None:
            tokenizer.save(workdir)
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """Returns the number of pieces in the model."""
        return int(self._sp.get_piece_size())

    @property
    def model_type(self) -> str:
        """Returns 'bpe' or 'unigram'."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._model_proto)
        return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(
            proto.trainer_spec.model_type
        ).lower()

    def encode(self, text: str) -> np.ndarray:
        """Returns the piece ids of text (no BOS/EOS added)."""
        return np.asarray(self._sp.encode(check_text(text), out_type=int), dtype=np.int32)

    def decode(self, ids: Any) -> str:
        """Returns the text of piece ids (invalid byte sequences become U+FFFD)."""
        ids = _as_id_array(ids)
        _check_id_range(ids, self.vocab_size)
        return self._sp.decode(ids.tolist())

    def _identity(self) -> Any:
        return self._model_proto

    @property
    def eot_id(self) -> int | None:
        """SentencePiece's end-of-sentence piece (</s>), if the model has one."""
        eos = int(self._sp.eos_id())
        return eos if eos >= 0 else None

    def _config(self) -> dict[str, Any]:
        """Returns the model file name and summary fields."""
        return {
            "model_file": SENTENCEPIECE_MODEL,
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
        }

    def save(self, directory: str) -> None:
        """Writes tokenizer.model and tokenizer.json to directory."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, SENTENCEPIECE_MODEL), "wb") as f:
            f.write(self._model_proto)
        super().save(directory)


class BPETokenizer(Tokenizer):
    """Byte-level BPE through Hugging Face's `tokenizers` (GPT-2's scheme): any text encodes.

    Build it with `train` (on a corpus, offline) or `from_file` (a `tokenizer.json` such as
    GPT-2's). Its end-of-text token, where the vocabulary has one, separates documents."""

    kind = "bpe"

    def __init__(self, serialized: str) -> None:
        """From the JSON text of a Hugging Face tokenizer (its tokenizer.json)."""
        from tokenizers import Tokenizer as HFTokenizer

        self._json = serialized
        self._tok = HFTokenizer.from_str(serialized)
        # Text is encoded as ordinary text, as tiktoken's `encode_ordinary` (which nanoGPT
        # prepares with) does: a corpus or prompt that contains "<|endoftext|>" gets the
        # tokens of those 13 characters, never the separator id that only preparation inserts.
        # Hugging Face matches added special tokens in any text, so they are left out here.
        spec = json.loads(serialized)
        spec["added_tokens"] = [t for t in spec.get("added_tokens") or [] if not t.get("special")]
        self._ordinary = HFTokenizer.from_str(json.dumps(spec))

    @classmethod
    def from_file(cls, path: str) -> BPETokenizer:
        """Loads a Hugging Face tokenizer.json; ValueError naming the file if it is not one."""
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            return cls(text)
        except Exception as e:
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({e}).") from e

    @classmethod
    def from_vocab_and_merges(
        cls, vocab_path: str, merges_path: str, special_tokens: Sequence[str] = (END_OF_TEXT,)
    ) -> BPETokenizer:
        """GPT-2's original tokenizer files (vocab.json: token -> id; merges.txt: the BPE merges
        in rank order) as byte-level BPE, through `tokenizers.ByteLevelBPETokenizer` (GPT-2's
        regex pre-tokenization, no prefix space). Those of `special_tokens` that the vocabulary
        holds (GPT-2's <|endoftext|>, id 50256) become special tokens, matched whole in text as
        Hugging Face's GPT2Tokenizer matches them. ValueError naming the files if they are not
        such files."""
        from tokenizers import ByteLevelBPETokenizer

        try:
            tok = ByteLevelBPETokenizer(vocab_path, merges_path)
        except Exception as e:
            raise ValueError(
                f"{vocab_path} and {merges_path} are not a byte-level BPE's vocab.json and "
                f"merges.txt ({e})."
            ) from e
        present = [t for t in special_tokens if tok.token_to_id(t) is not None]
        if present:
            tok.add_special_tokens(present)
        return cls(tok.to_str())

    @property
    def model_type(self) -> str:
        """The Hugging Face tokenizer model's type: 'BPE' (GPT-2's), 'WordPiece', 'Unigram'..."""
        return type(self._tok.model).__name__

    def save_hugging_face_files(self, directory: str) -> list[str]:
        """Writes Hugging Face's tokenizer files into directory: tokenizer.json (this
        tokenizer's JSON, unchanged) and, for a BPE model, GPT-2's vocab.json and merges.txt
        (what older loaders read). Returns the file names written."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TOKENIZER_JSON), "w", encoding="utf-8") as f:
            f.write(self._json)
        written = [TOKENIZER_JSON]
        if self.model_type == "BPE":
            written += [os.path.basename(p) for p in self._tok.model.save(directory)]
        return written

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int = DEFAULT_BPE_VOCAB_SIZE) -> BPETokenizer:
        """Trains a byte-level BPE of `vocab_size` tokens (END_OF_TEXT included) on `texts`."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok.to_str())

    @property
    def vocab_size(self) -> int:
        """Number of token ids (added tokens included)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eot_id(self) -> int | None:
        """The id of <|endoftext|>, if the vocabulary has it."""
        return self._tok.token_to_id(END_OF_TEXT)

    def encode(self, text: str) -> np.ndarray:
        """Returns the token ids of text as a 1-D int32 array: ordinary text only (special
        tokens' text, such as "<|endoftext|>", encodes as its characters; none is added)."""
        ids = self._ordinary.encode(check_text(text), add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of many texts at once (the library parallelises it)."""
        out = self._ordinary.encode_batch([check_text(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in out]

    def decode(self, ids: Any) -> str:
        """Returns the text of ids (special tokens kept, e.g. <|endoftext|>)."""
        ids = _as_id_array(ids)
        _check_id_range(ids, self.vocab_size)
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def _identity(self) -> Any:
        return self._json

    def _config(self) -> dict[str, Any]:
        return {"model_file": BPE_MODEL, "vocab_size": self.vocab_size}

    def save(self, directory: str) -> None:
        """Writes tokenizer_bpe.json (Hugging Face's format) and tokenizer.json."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, BPE_MODEL), "w", encoding="utf-8") as f:
            f.write(self._json)
        super().save(directory)


def load_tokenizer(directory: str) -> Tokenizer:
    """Restores a tokenizer written by Tokenizer.save(directory)."""
    path = os.path.join(directory, TOKENIZER_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {TOKENIZER_JSON} in {directory}; save a tokenizer there first."
        )
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    kind = config.get("kind")
    if kind == "char":
        return CharTokenizer(list(config["chars"]))
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        model_path = os.path.join(directory, config.get("model_file", SENTENCEPIECE_MODEL))
        with open(model_path, "rb") as f:
            return SentencePieceTokenizer(f.read())
    if kind == "bpe":
        return BPETokenizer.from_file(os.path.join(directory, config.get("model_file", BPE_MODEL)))
    raise ValueError(f"{path} has unknown tokenizer kind {kind!r}; known: {TOKENIZER_KINDS}.")


def build_tokenizer(
    kind: str,
    text: str,
    vocab_size: int | None = None,
    model_type: str = "bpe",
) -> Tokenizer:
    """Builds a 'char', 'byte', 'sentencepiece' or 'bpe' tokenizer of `text`.

    vocab_size applies to sentencepiece and bpe, model_type to sentencepiece only (char and byte
    vocabularies are fixed by the text and by UTF-8).
    """
    tokenizer: Tokenizer
    if kind == "char":
        tokenizer = CharTokenizer.from_text(text)
    elif kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "sentencepiece":
        tokenizer = SentencePieceTokenizer.train(
            text,
            vocab_size=vocab_size or DEFAULT_SENTENCEPIECE_VOCAB_SIZE,
            model_type=model_type,
        )
    elif kind == "bpe":
        tokenizer = BPETokenizer.train(iter([text]), vocab_size or DEFAULT_BPE_VOCAB_SIZE)
    else:
        raise ValueError(
            f"Unknown tokenizer kind {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}."
        )
    return tokenizer
