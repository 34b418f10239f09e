"""`m3ae ood`: out-of-distribution detection (Mahalanobis and max-softmax AUROC) + histogram PNG."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import _evalargs as E


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ood", help="OOD detection AUROC (paper: CIFAR-100 in, CIFAR-10 out)",
                       description="In-distribution classifier features: a fine-tuned classifier folder "
                                   "(m3ae finetune), or a pretrained encoder plus a fast linear probe fitted "
                                   "on --in-train. Scores: Mahalanobis (class means + shared covariance) "
                                   "and max softmax.")
    E.add_model_args(p)
    p.add_argument("--in-train", required=True, help="in-distribution training data (class means, covariance, probe)")
    p.add_argument("--in-test", required=True, help="in-distribution test data")
    p.add_argument("--out-test", default=None, help="out-of-distribution test data (default: --in-test, "
                   "with --in-classes / --out-classes splitting one dataset)")
    p.add_argument("--in-classes", default=None, help="e.g. 0-4: keep these classes as in-distribution")
    p.add_argument("--out-classes", default=None, help="e.g. 5-9: these classes of --out-test are OOD")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--out", required=True, help="folder for ood.json and ood_hist.png")
    p.set_defaults(func=run)


def _select(x, y, logits, classes, remap=None):
    """Rows whose label is in `classes`; labels renumbered through `remap` when given."""
    import torch
    mask = torch.isin(y, torch.tensor(classes))
    y = y[mask] if remap is None else remap[y[mask]]
    return x[mask], y, (logits[mask] if logits is not None else None)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.fast_probe import fast_probe, fit_logistic
    from ..eval.features import extract_features
    from ..eval.finetune import Classifier, is_classifier_dir
    from ..eval.ood import ood_histogram, ood_scores, parse_classes
    from ..eval.results import summary_line, write_result

    t0 = time.perf_counter()
    from ..distributed import pick_device  # torch: imported when run, not for --help
    device = pick_device(args.device)
    in_classes, out_classes = parse_classes(args.in_classes), parse_classes(args.out_classes)
    finetuned = is_classifier_dir(args.checkpoint)
    model = (Classifier.from_pretrained(args.checkpoint).to(device).eval() if finetuned
             else E.load_encoder(args.checkpoint, device))
    size = model.config.image_size

    @torch.no_grad()
    def features(spec, split, limit):
        ds = E.dataset(args, spec, split, size, False, limit)
        if not finetuned:
            x, y = extract_features(model, ds, args.pool, args.batch_size, device, args.num_workers,
                                    progress=not args.quiet, desc=f"features {spec.split('/')[-1]}")
            return x, y, None
        xs, ls, ys = [], [], []
        for image, label in torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers):
            f = model.features(image.to(device)).float()
            xs.append(f.cpu()), ls.append(model.head(f).float().cpu()), ys.append(label)
        return torch.cat(xs), torch.cat(ys), torch.cat(ls)

    train_x, train_y, train_l = features(args.in_train, "train", args.limit_train)
    in_x, in_y, in_l = features(args.in_test, "val", args.limit_test)
    if args.out_test in (None, args.in_test):  # one dataset split by classes: extract it once
        out_x, out_y, out_l = in_x, in_y, in_l
    else:
        out_x, out_y, out_l = features(args.out_test, "val", args.limit_test)
    if in_classes is not None:  # keep in-classes and renumber them 0..k-1
        remap = torch.full((int(max(train_y.max(), in_y.max(), max(in_classes))) + 1,), -1, dtype=torch.long)
        remap[torch.tensor(in_classes)] = torch.arange(len(in_classes))
        train_x, train_y, train_l = _select(train_x, train_y, train_l, in_classes, remap)
        in_x, in_y, in_l = _select(in_x, in_y, in_l, in_classes, remap)
    if out_classes is not None:
        out_x, out_y, out_l = _select(out_x, out_y, out_l, out_classes)
    if not len(train_x) or not len(in_x) or not len(out_x):
        raise ValueError("an empty set after class selection; check --in-classes / --out-classes")
    classes = int(train_y.max()) + 1
    extra = {}
    if finetuned:
        if in_classes is not None:
            raise ValueError("--in-classes needs a pretrained encoder (a fine-tuned head has fixed classes)")
        in_logits, out_logits = in_l, out_l
    else:  # an in-distribution linear classifier on the frozen features, for max softmax
        probe = fast_probe(train_x, train_y, in_x, in_y, classes)
        linear = fit_logistic(train_x, train_y, classes, probe["l2"])
        in_logits, out_logits = linear.logits(in_x), linear.logits(out_x)
        extra["in_probe_top1"] = probe["top1"]
    aurocs, scores = ood_scores(train_x, train_y, in_x, out_x, in_logits, out_logits, classes)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = ood_histogram(out_dir / "ood_hist.png", scores, aurocs)
    metrics = {"auroc_mahalanobis": 100 * aurocs["mahalanobis"], "auroc_max_softmax": 100 * aurocs["max_softmax"],
               **extra, "n_in": len(in_x), "n_out": len(out_x), "n_train": len(train_x)}
    seconds = time.perf_counter() - t0
    path = write_result(Path(args.result) if args.result else out_dir / "ood.json", "ood",
                        checkpoint=args.checkpoint, data=E.data_record(args), settings=E.settings_record(args),
                        metrics=metrics, seconds=seconds,
                        extra={"classifier": "finetuned" if finetuned else "frozen encoder + fast probe",
                               "histogram": str(png)})
    print(summary_line("ood", metrics, seconds) + f" (result {path}, figure {png})")
    return 0
