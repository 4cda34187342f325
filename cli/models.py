"""`captioning models add|list|show|promote|rollback`: the model registry (captioning/registry.py)."""

from __future__ import annotations

import argparse
import json

from captioning.errors import CaptioningError
from jobs.options import non_negative_int, result, storage_config


def register(commands: argparse._SubParsersAction) -> None:
    """Add the models command group."""
    group = commands.add_parser("models", help="the model registry: versions, the current one, its history")
    actions = group.add_subparsers(dest="action", required=True)

    def action(name: str, helptext: str, handler) -> argparse.ArgumentParser:  # noqa: ANN001
        parser = actions.add_parser(name, help=helptext)
        parser.add_argument("--registry", required=True, help="registry folder or s3:// prefix")
        parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
        parser.set_defaults(handler=handler)
        return parser

    add = action("add", "register a model bundle as a new version (not promoted unless --promote)", run_add)
    add.add_argument("model", help="bundle folder or s3:// prefix")
    add.add_argument("--promote", action="store_true", help="also make it current")
    add.add_argument("--reason", default="added by hand", help="why, kept in the registry's history")
    action("list", "every version, the current one marked *", run_list)
    show = action("show", "one version's record, and where its bundle is; --html: a page to look at", run_show)
    show.add_argument("version", help="a version, such as v0003")
    show.add_argument("--html", default=None, metavar="FOLDER",
                      help="write FOLDER/index.html: lineage, holdout scores against the parent, training curves, "
                           "holdout gallery with attention per word")
    show.add_argument("--gallery", type=non_negative_int, default=12, help="holdout images in the page")
    promote = action("promote", "make a version current", run_promote)
    promote.add_argument("version", help="the version to make current, such as v0003")
    promote.add_argument("--reason", required=True, help="why (kept in the history)")
    rollback = action("rollback", "move current back to its parent", run_rollback)
    rollback.add_argument("--reason", required=True, help="why (kept in the history)")
    action("history", "every promotion and rollback, oldest first", run_history)


def _registry(args: argparse.Namespace, existing: bool = True):  # noqa: ANN202
    """The --registry; existing: it must hold something already (a typo is an error, not an empty listing)."""
    from captioning.registry import Registry  # noqa: PLC0415
    from captioning.storage import Storage  # noqa: PLC0415

    registry = Registry(args.registry, Storage(storage_config(args)))
    if existing and not registry.exists():
        raise CaptioningError(args.registry, "no registry here (nothing was ever added to it); check --registry")
    return registry


def run_add(args: argparse.Namespace) -> int:
    """captioning models add."""
    from captioning.registry import add_bundle  # noqa: PLC0415

    registry = _registry(args, existing=False)
    version = add_bundle(registry, args.model, {"source": args.model, "decision": "added by hand"})
    result(f"{version} added from {args.model}")
    if args.promote:
        registry.promote(version, args.reason)
        result(f"{version} is current")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """captioning models list."""
    registry = _registry(args)
    pointer, _ = registry.current()
    current = (pointer or {}).get("version")
    rows = [("", "version", "created", "parent", "BLEU-4", "CIDEr", "decision")]
    for version in registry.versions():
        info = registry.info(version)
        scores = (info.get("holdout") or {}).get("scores", {})
        rows.append(("*" if version == current else "", version, info.get("created", ""), info.get("parent") or "-",
                     f"{scores['bleu4']:.4f}" if "bleu4" in scores else "-",
                     f"{scores['cider']:.4f}" if "cider" in scores else "-", str(info.get("decision", ""))[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        result("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if current is None:
        result("(nothing is current yet)")
    return 0


def run_show(args: argparse.Namespace) -> int:
    """captioning models show."""
    registry = _registry(args)
    if args.html:
        from captioning.report import write_report  # noqa: PLC0415

        result(f"report: {write_report(registry, args.version, args.html, args.gallery)}")
        return 0
    result(json.dumps({**registry.info(args.version), "bundle": registry.bundle_uri(args.version)}, indent=2))
    return 0


def run_promote(args: argparse.Namespace) -> int:
    """captioning models promote."""
    previous = _registry(args).promote(args.version, args.reason)
    result(f"{args.version} is current (was {previous or 'nothing'})")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    """captioning models rollback."""
    parent = _registry(args).rollback(args.reason)
    result(f"rolled back: {parent} is current")
    return 0


def run_history(args: argparse.Namespace) -> int:
    """captioning models history."""
    for event in _registry(args).history():
        result(f"{event['at']}  {event['event']:<9} {event['version']}  (was {event.get('previous') or '-'})  "
               f"by {event['by']}: {event.get('reason', '')}")
    return 0
