"""Open vocabulary on real photos: every category name of a labelled folder asked as a text query.

Relevant photos are the query's own category's; all the folder's photos are ranked; figures are
precision@5 and mean average precision. The categories are split once, in a fixed way: sorted by
name, those at even positions form the validation half (any choice may look at it), those at odd
positions the test half (reported, never used to choose). With `../shared/data/imagenet200` that is
100 categories each (`accordion`, `ant`, `apple`, ... validation; `airplane`, `antelope`, ... test).

A category name becomes a query as a user would type it: `_` and `-` read as spaces, the word `or`
dropped (`cup_or_mug` -> `cup mug`), words without a vector dropped; a name none of whose words has
a vector is not asked (and counted as such).

Broad words (`animal`, `vehicle`, `fruit`, `furniture`) are asked too, where the photos' file names
start with their category's WordNet id (`n02084071_...jpg`, as in imagenet200): every one-word WordNet
hypernym shared by at least 3 of the asked categories and by at most 30% of them is a query, and
its relevant photos are those of the categories below it. Their figure is precision@10.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from batch.images import ImageRecord, labelled, list_images
from batch.wordnet import WordNet
from services.encoder.query import Expand, Term, embed

REPO = Path(__file__).resolve().parents[1]
SHARED_OPEN_DATA = REPO.parent / "shared" / "data" / "imagenet200"
_WNID = re.compile(r"^(n\d{8})_")


def default_folder() -> str | None:
    """../shared/data/imagenet200 when it is there."""
    return str(SHARED_OPEN_DATA) if SHARED_OPEN_DATA.is_dir() else None


def split_labels(labels: list[str] | set[str]) -> tuple[list[str], list[str]]:
    """(validation half, test half) of the category names: even and odd positions in sorted order."""
    ordered = sorted(labels)
    return ordered[0::2], ordered[1::2]


def label_query(label: str, rows: dict[str, int], vectors: np.ndarray, expand: Expand | None = None) -> np.ndarray | None:
    words = [w for w in re.split(r"[_\-\s]+", label.lower()) if w and w != "or" and w in rows]
    return embed([Term(w, 1.0) for w in words], rows, vectors, expand) if words else None


def records(folder: str | Path, half: str = "all") -> list[ImageRecord]:
    """The folder's labelled photos: of the `validation` half, the `test` half, or `all`."""
    found = labelled(list_images(folder))
    if half == "all":
        return found
    validation, test = split_labels({r.label for r in found})
    keep = set(validation if half == "validation" else test)
    return [r for r in found if r.label in keep]


@dataclass
class OpenSet:
    """Real photos with their categories: the ranked collection, and the categories to ask."""

    features: np.ndarray  # (N, F) backbone features
    truth: np.ndarray  # (N,) category names
    ids: list[str]
    paths: list[str]
    synsets: dict[str, str] = field(default_factory=dict)  # category -> WordNet id, where file names tell
    broad: dict[str, list[str]] = field(default_factory=dict)  # broad word -> its categories (broad_words)

    def score(self, vectors: np.ndarray, rows: dict[str, int], word_vectors: np.ndarray,
              expand: Expand | None = None, queries: "OpenQueries | None" = None) -> dict:
        """Category-name mAP, broad-word P@10, and `score`: their mean (the mAP alone without broad words).
        `queries`: this set's `queries(rows, word_vectors, expand)`, made once for many scores."""
        queries = queries or self.queries(rows, word_vectors, expand)
        names = ranked(vectors, self.truth, queries.categories)["map"]
        broad = precision_at(vectors, self.truth, self.broad, queries.broad)["p10"] if self.broad else None
        return {"map": names, "broad_p10": broad, "score": names if broad is None else (names + broad) / 2}

    def queries(self, rows: dict[str, int], word_vectors: np.ndarray, expand: Expand | None = None) -> "OpenQueries":
        """The query vectors of its category names and broad words (through `expand`)."""
        return OpenQueries(label_queries(sorted(set(self.truth.tolist())), rows, word_vectors, expand),
                           {word: embed([Term(word, 1.0)], rows, word_vectors, expand) for word in self.broad})


@dataclass(frozen=True)
class OpenQueries:
    categories: dict[str, np.ndarray | None]  # None: no word of the name has a vector
    broad: dict[str, np.ndarray]


def category_synsets(found: list[ImageRecord]) -> dict[str, str]:
    """Category -> WordNet noun id, for categories whose photos' file names all start with the same one."""
    ids: dict[str, set[str]] = {}
    for record in found:
        match = _WNID.match(Path(record.path).name)
        ids.setdefault(record.label, set()).add(match.group(1) if match else "")
    return {label: next(iter(found)) for label, found in ids.items() if len(found) == 1 and "" not in found}


def broad_words(synsets: dict[str, str], categories: list[str], names: WordNet, rows: dict[str, int],
                min_categories: int = 3, max_share: float = 0.3) -> dict[str, list[str]]:
    """One-word WordNet hypernyms shared by several of `categories` -> the categories below each."""
    below: dict[str, set[str]] = {}
    for label in categories:
        if label in synsets and synsets[label].lstrip("n") in names.synsets:
            for hypernym in names.ancestors(synsets[label]):
                below.setdefault(hypernym, set()).add(label)
    out: dict[str, list[str]] = {}
    for hypernym, labels in sorted(below.items()):
        word = names.synsets[hypernym].words[0].lower()
        if min_categories <= len(labels) <= max_share * len(categories) and " " not in word and word in rows:
            out.setdefault(word, sorted(labels))
    return out


def broad_precision(vectors: np.ndarray, truth: np.ndarray, queries: dict[str, list[str]], rows: dict[str, int],
                    word_vectors: np.ndarray, k: int = 10, expand: Expand | None = None) -> dict:
    """precision@k of each broad word over `vectors`, relevant = photos of its categories; and the mean."""
    return precision_at(vectors, truth, queries, {word: embed([Term(word, 1.0)], rows, word_vectors, expand)
                                                  for word in queries}, k)


def precision_at(vectors: np.ndarray, truth: np.ndarray, queries: dict[str, list[str]],
                 query_vectors: dict[str, np.ndarray], k: int = 10) -> dict:
    """broad_precision with each word's query vector given."""
    per_query = {word: float(np.isin(truth[np.argsort(-(vectors @ query_vectors[word]))[:k]], labels).mean())
                 for word, labels in queries.items()}
    return {"queries": len(per_query), "p10": float(np.mean(list(per_query.values()))) if per_query else 0.0,
            "per_query": per_query}


def label_queries(labels: list[str], rows: dict[str, int], word_vectors: np.ndarray,
                  expand: Expand | None = None) -> dict[str, np.ndarray | None]:
    return {label: label_query(label, rows, word_vectors, expand) for label in labels}


def retrieval(vectors: np.ndarray, truth: np.ndarray, queries: list[str], rows: dict[str, int],
              word_vectors: np.ndarray, expand: Expand | None = None) -> dict:
    """P@5 and AP of each category name as a query over `vectors` (unit, one per photo), and their means."""
    return ranked(vectors, truth, label_queries(queries, rows, word_vectors, expand))


def ranked(vectors: np.ndarray, truth: np.ndarray, queries: dict[str, np.ndarray | None]) -> dict:
    """retrieval with each category's query vector given (None: not asked)."""
    per_query, skipped = {}, []
    for label, query in queries.items():
        if query is None:
            skipped.append(label)
            continue
        relevant = truth[np.argsort(-(vectors @ query), kind="stable")] == label
        ranks = np.flatnonzero(relevant)
        ap = float(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1))) if len(ranks) else 0.0
        per_query[label] = {"p5": float(relevant[:5].mean()), "ap": ap}
    values = list(per_query.values())
    return {"queries": len(values), "not_asked": skipped,
            "p5": float(np.mean([v["p5"] for v in values])) if values else 0.0,
            "map": float(np.mean([v["ap"] for v in values])) if values else 0.0,
            "per_query": per_query}


def open_set(found: list[ImageRecord], features: dict[str, np.ndarray]) -> OpenSet | None:
    """The readable ones of `found` with their features (by path); None when there are none."""
    ok = [r for r in found if r.path in features]
    if not ok:
        return None
    return OpenSet(np.stack([features[r.path] for r in ok]), np.asarray([r.label for r in ok]),
                   [r.id for r in ok], [r.path for r in ok], category_synsets(ok))
