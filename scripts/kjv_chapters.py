"""Writes the King James Bible as JSON Lines, one record {"text": ...} per chapter (1,189).

    .venv/bin/python scripts/kjv_chapters.py --out=.data/text/kjv_chapters.jsonl
    .venv/bin/python -m data.prepare --source=.data/text/kjv_chapters.jsonl --tokenizer=bpe \
        --vocab_size=2048 --out=.data/tokens/kjv_chapters_bpe2048

A chapter's text is its verses' lines exactly as the `kjv` corpus has them ("Ge1:1 In the
beginning ...", each line ending in a newline), so the records concatenated are that corpus
byte for byte; `data.prepare` then puts the tokenizer's end-of-text token after each chapter,
which is what `config.packing=True` packs by (docs/data.md, "Packed documents"). The text is
the `kjv` corpus's file (`data/sources.py`: `write_bible_text`, from the `bible` command of the
Debian package bible-kjv-text), written first if it is missing, or `--kjv=PATH`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import sources  # noqa: E402

# "Ge1:1 ...", "1Co13:4 ...": a book's abbreviation, then chapter:verse.
VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) ")


def chapters(text: str) -> list[str]:
    """The chapters of the KJV text (one verse a line), in order, each its lines verbatim.
    ValueError naming the line if a non-empty line is not a verse."""
    out: list[str] = []
    current: tuple[str, str] | None = None
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        match = VERSE.match(line)
        if match is None:
            if line.strip():
                raise ValueError(f"line {number} is not a verse: {line[:80]!r}")
            continue
        chapter = (match.group(1), match.group(2))
        if chapter != current:
            out.append("")
            current = chapter
        out[-1] += line
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="The JSON Lines file to write.")
    parser.add_argument("--kjv", default=None, help="The KJV text (default: the kjv corpus's).")
    args = parser.parse_args(argv)
    path = args.kjv or sources.default_bible_path()
    if args.kjv is None and not os.path.isfile(path):
        sources.write_bible_text(path)
    with open(path, encoding="utf-8", newline="") as f:
        docs = chapters(f.read())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    sizes = sorted(len(d) for d in docs)
    print(
        f"Wrote {len(docs)} chapters to {args.out} (characters per chapter: min {sizes[0]}, "
        f"median {sizes[len(sizes) // 2]}, max {sizes[-1]})"
    )


if __name__ == "__main__":
    main()
