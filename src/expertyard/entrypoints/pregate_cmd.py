"""`expertyard pregate fit`: fit the `trained` pre-gate predictor on calibration text and report its recall."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

from expertyard.assets import derived_files_dir
from expertyard.entrypoints.common import add_model_args, bundled_model_path, engine_from_args, model_dir_of
from expertyard.errors import ConfigError
from expertyard.experts.predictors import NextGatePredictor
from expertyard.experts.predictors.trained import (FILE_NAME, LOSSES, FrequencyPredictor, TrainedPredictor,
                                                   collect_routing, recall_by_distance)

HOLDOUT = 0.1  # fraction of the documents held out for the recall report
CHUNK_CHARS = 2000  # text without <|endoftext|> separators is cut at paragraph breaks into chunks this long


def add_parser(sub) -> None:
    p = sub.add_parser("pregate", help="pre-gate predictors (fit the `trained` one)")
    cmds = p.add_subparsers(dest="pregate_command", required=True)
    f = cmds.add_parser("fit", help="fit the trained pre-gate predictor on text; report held-out recall",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(f)
    f.add_argument("--text", type=Path, required=True,
                   help="UTF-8 text; documents separated by <|endoftext|>, cut at paragraph breaks into ~2000-char chunks")
    f.add_argument("--depth", type=int, default=3, choices=[1, 2, 3], help="MoE layers predicted ahead")
    f.add_argument("--max-tokens", type=int, default=100_000, help="tokens of text to run (10%% of documents held out)")
    f.add_argument("--epochs", type=int, default=10, help="passes over the training documents")
    f.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    f.add_argument("--loss", choices=LOSSES, default=LOSSES[0],
                   help="topk-ce: cross-entropy to the true top-k gate probabilities; kl: to the whole router softmax")
    f.add_argument("--seed", type=int, default=0, help="document shuffle and minibatch order")
    f.add_argument("--out", type=Path, default=None,
                   help=f"predictor file (default: {FILE_NAME} beside a model of your own; for the bundled model or a "
                        "Hugging Face hub id, in $XDG_CACHE_HOME/expertyard/models/NAME/, which --predictor trained "
                        "reads first)")
    f.set_defaults(func=run_fit)


def documents(text: str) -> list[str]:
    """Documents (separated by <|endoftext|>, else the whole text), each cut at paragraph breaks into chunks of
    about CHUNK_CHARS, so that a long work gives many documents to hold out from."""
    from expertyard.trace.record import DOC_SEPARATOR

    chunks = []
    for doc in text.split(DOC_SEPARATOR):
        cur = ""
        for para in re.split(r"\n\s*\n", doc):
            if para.strip():
                cur = f"{cur}\n\n{para.strip()}" if cur else para.strip()
            if len(cur) >= CHUNK_CHARS:
                chunks.append(cur)
                cur = ""
        if cur:
            chunks.append(cur)
    return chunks


def _out_path(args) -> Path:
    if args.out is not None:
        out = args.out
    else:  # never into the installed package or a hub cache: those go to the user's cache folder
        model_dir = model_dir_of(args)
        folder = derived_files_dir(model_dir)
        if folder != Path(model_dir).resolve():  # the cache folder (a model's own folder is never created here)
            folder.mkdir(parents=True, exist_ok=True)
        out = folder / FILE_NAME
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        where = "--out" if args.out is not None else "the model folder"
        raise ConfigError(f"{out}: {where} is not writable; pass --out FILE, then run with --predictor trained "
                          "--predictor-path FILE")
    if args.out is None and _loader_reads(out.name):
        raise ConfigError(f"{out}: this version's model loader reads every *.safetensors of a model folder without "
                          "model.safetensors.index.json, so a predictor saved there would break loading the model; "
                          "pass --out FILE, then run with --predictor trained --predictor-path FILE")
    return out


def _loader_reads(name: str) -> bool:
    """Would the checkpoint loader take a file called `name` beside model.safetensors for a shard?"""
    import tempfile

    from expertyard.loader.checkpoint import checkpoint_files

    with tempfile.TemporaryDirectory() as d:
        for f in ("model.safetensors", name):
            (Path(d) / f).touch()
        return name in {f.name for f in checkpoint_files(Path(d))}


def run_fit(args) -> int:
    if not args.text.is_file():
        raise ConfigError(f"--text {args.text}: no such file")
    if args.max_tokens < 20 or args.epochs < 1:
        raise ConfigError(f"--max-tokens {args.max_tokens} must be >= 20 and --epochs {args.epochs} >= 1")
    out = _out_path(args)  # fail before the long part
    engine = engine_from_args(args)
    if engine.tokenizer is None:
        raise ConfigError("pregate fit needs a tokenizer")
    model = engine.model
    if len(model.cfg.moe_layers) < 2:
        raise ConfigError(f"the model has {len(model.cfg.moe_layers)} MoE layer(s): nothing to predict ahead")
    docs = documents(args.text.read_text(encoding="utf-8"))
    random.Random(args.seed).shuffle(docs)  # the held-out documents are drawn from the whole file
    t0 = time.perf_counter()
    data = collect_routing(engine, (engine.tokenizer(d).input_ids for d in docs), args.max_tokens,
                           progress=not args.json)
    n_docs = len(data.doc_lens)
    n_held = round(n_docs * HOLDOUT)
    if n_held < 1 or n_held == n_docs:
        raise ConfigError(f"{args.text}: {n_docs} document(s) within --max-tokens {args.max_tokens}; "
                          "need at least 10 to hold out 10%")
    train, held = data.documents(list(range(n_docs - n_held))), data.documents(list(range(n_docs - n_held, n_docs)))
    t1 = time.perf_counter()
    trained = TrainedPredictor.fit(model, train, args.depth, epochs=args.epochs, lr=args.lr, loss=args.loss,
                                   seed=args.seed)
    t2 = time.perf_counter()
    cfg = model.cfg
    baselines = {"next-gate": NextGatePredictor(model, args.depth), "trained": trained,
                 "frequency": FrequencyPredictor(train, list(cfg.moe_layers), cfg.moe.top_k, cfg.moe.num_experts,
                                                 args.depth)}
    heldout = {name: recall_by_distance(p, held) for name, p in baselines.items()}
    train_recall = {name: recall_by_distance(p, train) for name, p in baselines.items() if name != "frequency"}
    trained.meta["fit"] |= {"text": args.text.name, "train_documents": n_docs - n_held, "heldout_documents": n_held,
                            "heldout_tokens": held.num_tokens, "heldout_recall": heldout}
    trained.save(out)
    result = {"model": str(args.model or bundled_model_path()), "text": str(args.text), "out": str(out),
              "depth": args.depth, "top_k": cfg.moe.top_k, "epochs": args.epochs, "loss": args.loss,
              "train_tokens": train.num_tokens, "heldout_tokens": held.num_tokens, "train_documents": n_docs - n_held,
              "heldout_documents": n_held, "collect_s": t1 - t0, "fit_s": t2 - t1,
              "heldout_recall": heldout, "train_recall": train_recall}
    if args.json:
        print(json.dumps(result))
        return 0
    k = cfg.moe.top_k
    print(f"{train.num_tokens:,} training tokens ({n_docs - n_held} documents), {held.num_tokens:,} held-out tokens "
          f"({n_held} documents); routing collected in {t1 - t0:.1f} s, fitted in {t2 - t1:.1f} s", file=sys.stderr)
    print(f"held-out recall@{k}: share of the true top-{k} experts of the MoE layer j ahead in the predicted top-{k}")
    print(f"{'j':>3} {'next-gate':>10} {'trained':>10} {'frequency':>10}")
    for j in range(len(heldout["trained"])):
        print(f"{j + 1:>3} " + " ".join(f"{heldout[n][j]:>10.3f}" for n in ("next-gate", "trained", "frequency")))
    print(f"saved {out}; run with --predictor trained" + ("" if args.out is None else f" --predictor-path {out}"))
    return 0
