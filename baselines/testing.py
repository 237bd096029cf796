"""Stand-ins for files that normally come from the hub, for the tests and ``benchmarks/bench_gpu.py`` (which run
without it): built in code, loaded by the same code paths as the real files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


def bpe_clip_tokenizer(folder: Path, words: Iterable[str]) -> Any:
    """A real ``transformers.CLIPTokenizer`` whose BPE merges spell out ``words`` (lowercase a-z0-9), each word one
    token; ``vocab.json`` and ``merges.txt`` are written to ``folder``. Prompts are padded to 77 tokens either way,
    so its cost is the real tokenizer's."""
    import json

    from transformers import CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["<|startoftext|>", "<|endoftext|>"]
    vocab += list(chars) + [c + "</w>" for c in chars] + [p for c in ",.'-!" for p in (c, c + "</w>")]
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    for word in sorted(set(words)):
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
            pieces = [merged, *pieces[2:]]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
