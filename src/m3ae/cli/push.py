"""`m3ae push CKPT USER/REPO`: upload a checkpoint's model files and a model card to the Hugging Face Hub."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a checkpoint folder to the Hugging Face Hub, with a model card",
                       description="Uploads config.json, model.safetensors, tokenizer.json, "
                                   "preprocessor_config.json and a generated README.md (not the training "
                                   "state); a model file of an earlier push this folder lacks is deleted in "
                                   "the same commit. Authentication: `hf auth login` or HF_TOKEN.")
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("repo_id", help="USER/REPO on the Hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to commit to (default main)")
    p.add_argument("--results", nargs="*", default=[],
                   help="result JSON files of m3ae probe / knn / finetune ...: their metrics go into the card")
    p.set_defaults(func=run)


def card_results(paths: list[str]) -> dict[str, object]:
    """{"probe top1": 71.2, ...} from result files (m3ae.eval.results)."""
    out: dict[str, object] = {}
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read result file {path}: {err}") from None
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            raise ValueError(f"{path} is not an m3ae result file (no 'metrics')")
        data = record.get("data") or {}
        where = data.get("val") or data.get("data") or ""
        for key, value in record["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{record.get('command', Path(path).stem)} {key}" + (f" ({where})" if where else "")] = value
    return out


def run(args: argparse.Namespace) -> int:
    from ..hub import push_to_hub

    info = push_to_hub(args.checkpoint, args.repo_id, private=args.private, revision=args.revision,
                       results=card_results(args.results) or None)
    print(f"pushed {args.checkpoint} to {args.repo_id}: {info.commit_url}")
    return 0
