"""semsearch: the command line over the Gateway (search, similar, tag, words, add, delete, duplicates)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import grpc

from services.common import security
from services.common.image_terms import DEFAULT_IMAGE_WEIGHT
from services.gateway import gallery
from services.gateway import duplicates as duplicates_core
from services.gateway.client import DEFAULT_ADDRESS, Client, Duplicates, Explanation, ImageHit, Page, WordHit


def explanation_json(explanation: Explanation) -> dict:
    return {"shares": [{"term": s.term, "weight": round(s.weight, 6), "share": round(s.share, 6)}
                       for s in explanation.shares],
            "words": [{"word": w.word, "score": round(w.score, 6)} for w in explanation.words],
            "classes": [{"name": c.word, "score": round(c.score, 6)} for c in explanation.classes]}


def _hit_json(hit: ImageHit) -> dict:
    document = {"id": hit.id, "path": hit.path, "label": hit.label, "score": round(hit.score, 6)}
    if hit.explanation is not None:
        document["explanation"] = explanation_json(hit.explanation)
    return document


def image_json(query: str, hits: list[ImageHit]) -> dict:
    """The `--json` document of search and similar (also the web API's); with the next page's token
    when there is one, and each result's explanation when asked for."""
    document = {"query": query, "results": [_hit_json(h) for h in hits]}
    if getattr(hits, "next_page_token", ""):
        document["next_page_token"] = hits.next_page_token
    return document


def _page_number(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"pages are numbered from 1; got {number}")
    return number


def _nth_page(fetch: Callable[[str], Page], number: int) -> Page:
    """Page `number` (from 1) of a search, `fetch(page_token)` giving each page; empty past the last."""
    token = ""
    for _ in range(number - 1):
        token = fetch(token).next_page_token
        if not token:
            return Page()
    return fetch(token)


def word_json(key: str, hits: list[WordHit]) -> dict:
    """The `--json` document of tag ("tags") and words ("words")."""
    return {key: [{"word": h.word, "score": round(h.score, 6)} for h in hits]}


def _explanation_lines(explanation: Explanation) -> list[str]:
    """`= dog +0.412  image +0.450  fruit -0.050`, the words, and the ImageNet classes (when there are some)."""
    lines = ["       = " + "  ".join(f"{s.term} {s.share:+.3f}" for s in explanation.shares),
             "       words: " + ", ".join(w.word for w in explanation.words)]
    if explanation.classes:
        lines.append("       classes: " + ", ".join(f"{c.word} ({c.score:.2f})" for c in explanation.classes))
    return lines


def duplicates_json(found: Duplicates) -> dict:
    """The `--json` document of duplicates."""
    return {"threshold": found.threshold, "images": found.images, "without_features": found.without_features,
            "total_groups": found.total_groups,
            "groups": [{"size": len(group), "images": [{"id": h.id, "path": h.path, "label": h.label,
                                                        "score": round(h.score, 6)} for h in group]}
                       for group in found.groups]}


def _duplicates_table(found: Duplicates) -> str:
    lines = [f"{found.total_groups} group(s) of near-duplicates among {found.images} images "
             f"(threshold {found.threshold:g})"
             + (f"; {found.without_features} image(s) without features left out" if found.without_features else "")]
    for number, group in enumerate(found.groups, 1):
        lines.append(f"\ngroup {number}: {len(group)} images (score: similarity to the first)")
        lines.append(_image_table(group))
    if len(found.groups) < found.total_groups:
        lines.append(f"\n({found.total_groups - len(found.groups)} smaller group(s) not shown)")
    return "\n".join(lines)


def _image_table(hits: list[ImageHit]) -> str:
    if not hits:
        return "(no results)"
    width = max(len(h.id) for h in hits)
    lines = [f"{'#':>3}  {'score':>6}  {'label':<12} {'id':<{width}}  path"]
    for rank, h in enumerate(hits, 1):
        lines.append(f"{rank:>3}  {h.score:6.3f}  {(h.label or '-'):<12} {h.id:<{width}}  {h.path}")
        if h.explanation is not None:
            lines += _explanation_lines(h.explanation)
    return "\n".join(lines)


def _word_table(hits: list[WordHit]) -> str:
    if not hits:
        return "(no results)"
    return "\n".join([f"{'#':>3}  {'score':>6}  word"] +
                     [f"{rank:>3}  {h.score:6.3f}  {h.word}" for rank, h in enumerate(hits, 1)])


def _read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SystemExit(f"semsearch: cannot read image {path}: {error.strerror or error}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semsearch", description="Semantic image search over gRPC.")
    parser.add_argument("--gateway", default=os.environ.get("SEMSEARCH_GATEWAY", DEFAULT_ADDRESS),
                        help=f"gateway address (default: $SEMSEARCH_GATEWAY or {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")
    parser.add_argument("--token", default=os.environ.get("SEMSEARCH_TOKEN"),
                        help="bearer token for a gateway that requires one (default: $SEMSEARCH_TOKEN)")
    security.add_client_tls_arguments(parser, env_prefix="SEMSEARCH_", what="the gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, default_k: int) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("-k", type=int, default=default_k, help=f"how many results (default {default_k})")
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.add_argument("--html", metavar="FILE", help="also write a gallery page to FILE")
        return sub

    search = command("search", "images for text: dog, 'cat sofa', cat+sofa-dog, 'cat:2 sofa', "
                               "'dog + img:beach/0001.jpg - fruit'", 10)
    search.add_argument("query", nargs="?", help="the query language (may be left out with --like)")
    search.add_argument("--like", action="append", default=[], metavar="IMAGE_FILE",
                        help="add this photo to the query (repeat for several)")
    search.add_argument("--like-weight", type=float, default=DEFAULT_IMAGE_WEIGHT, metavar="W",
                        help=f"the weight of each --like photo (default {DEFAULT_IMAGE_WEIGHT:g}; a word's is 1)")
    similar = command("similar", "images similar to an image file", 10)
    similar.add_argument("image")
    for sub in (search, similar):
        sub.add_argument("--explain", action="store_true",
                         help="say why each photo matched: each term's share of its score, its words and classes")
        sub.add_argument("--min-score", type=float)
        sub.add_argument("--label", action="append", default=[], dest="labels",
                         help="only images with this label (repeat for any of several)")
        sub.add_argument("--folder", default="", help="only images whose id is under this folder (2024/)")
        sub.add_argument("--after", default="", help="only images taken on or after this date (2024-06-01)")
        sub.add_argument("--before", default="", help="only images taken before this date")
        sub.add_argument("--page", type=_page_number, default=1, help="which page of k results (default 1)")
    tag = command("tag", "the nearest words of the whole vocabulary for an image file", 5)
    tag.add_argument("image")
    tag.add_argument("--mode", default="", choices=["", "devise", "conse", "hybrid", "gated"],
                     help="how the image becomes a vector (default: the artifact's mode)")
    words = command("words", "words similar to a word", 10)
    words.add_argument("word")
    add = commands.add_parser("add", help="add image files to the collection (searchable at once, kept on restart)")
    add.add_argument("images", nargs="+", metavar="image")
    add.add_argument("--label", help="a label for every image added")
    add.add_argument("--json", action="store_true", help="print JSON")
    delete = commands.add_parser("delete", help="remove images from the collection by id")
    delete.add_argument("ids", nargs="+", metavar="id")
    delete.add_argument("--json", action="store_true", help="print JSON")
    duplicates = commands.add_parser("duplicates", help="groups of near-identical images (resized, recompressed or "
                                                         "slightly cropped copies), largest first")
    duplicates.add_argument("--threshold", type=float,
                            help="cosine similarity of (square-rooted) backbone features that makes two images near-duplicates, "
                                 f"{duplicates_core.MIN_THRESHOLD} to 1 (default: the gateway's for the artifact's "
                                 "backbone, chosen on validation copies: "
                                 + ", ".join(f"{name} {value}" for name, value in duplicates_core.DEFAULT_THRESHOLDS.items())
                                 + f", {duplicates_core.DEFAULT_THRESHOLD} for others)")
    duplicates.add_argument("--folder", default="", help="only images whose id is under this folder (2024/)")
    duplicates.add_argument("--max-groups", type=int, default=0, help="show at most this many groups (default: all)")
    duplicates.add_argument("--json", action="store_true", help="print JSON")
    return parser


def run(args: argparse.Namespace, client: Client) -> tuple[dict, str, Callable[[], str]]:
    """(JSON document, readable table, the HTML page's maker) for the parsed command.

    The page reads and encodes every hit's image, so it is made only when `--html` asks for it."""
    if args.command == "search":
        if args.query is None and not args.like:
            raise SystemExit("semsearch: search needs a query, --like IMAGE_FILE, or both")
        like = [_read_image(path) for path in args.like]
        names = [Path(path).name for path in args.like]
        hits = _nth_page(lambda token: client.search(args.query, k=args.k, min_score=args.min_score, labels=args.labels,
                                                     folder=args.folder, page_token=token, after=args.after,
                                                     before=args.before, like=like, like_names=names,
                                                     like_weight=args.like_weight, explain=args.explain), args.page)
        query = " + ".join(([args.query] if args.query else []) + [f"like {name}" for name in names])
        return image_json(query, hits), _image_table(hits), lambda: gallery.render(f"search: {query}", hits)
    if args.command == "similar":
        image = _read_image(args.image)
        hits = _nth_page(lambda token: client.similar(image, k=args.k, min_score=args.min_score, labels=args.labels,
                                                      folder=args.folder, page_token=token, after=args.after,
                                                      before=args.before, explain=args.explain), args.page)
        return image_json(args.image, hits), _image_table(hits), \
            lambda: gallery.render(f"similar to {args.image}", hits, query_image=args.image)
    if args.command == "tag":
        hits = client.tag(_read_image(args.image), k=args.k, mode=args.mode)
        return word_json("tags", hits), _word_table(hits), \
            lambda: gallery.render(f"tags for {args.image}", words=hits, query_image=args.image)
    if args.command == "add":
        ids = client.add_images([_read_image(path) for path in args.images], [args.label] * len(args.images))
        return {"added": [{"file": path, "id": i} for path, i in zip(args.images, ids)]}, "\n".join(
            f"{i}  {path}" for path, i in zip(args.images, ids)), str
    if args.command == "delete":
        deleted = client.delete_images(args.ids)
        return {"deleted": deleted}, f"deleted {deleted} image(s)", str
    if args.command == "duplicates":
        found = client.duplicates(args.threshold, folder=args.folder, max_groups=args.max_groups)
        return duplicates_json(found), _duplicates_table(found), str
    hits = client.words(args.word, k=args.k)
    return word_json("words", hits), _word_table(hits), lambda: gallery.render(f"words like {args.word}", words=hits)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tls = security.or_exit("semsearch", security.client_tls_from_args, args)
    with Client(args.gateway, timeout=args.timeout, tls=tls, token=args.token) as client:
        try:
            document, table, page = run(args, client)
        except grpc.RpcError as error:
            print(f"semsearch: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(json.dumps(document, ensure_ascii=False) if args.json else table)
    if getattr(args, "html", None):
        Path(args.html).write_text(page(), encoding="utf-8")
        print(f"gallery written to {args.html}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
