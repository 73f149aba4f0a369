"""Write the bundled model's held-out documents (the training script's split: 5% of each corpus, seed 1234) as
text files, one per corpus, documents separated by <|endoftext|>:

    python scripts/write_heldout.py --corpus-dir ../shared/data/corpora --out .data/heldout
"""

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_tiny_moe import CORPORA, TrainConfig, split_corpus  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-dir", type=Path, default=Path(__file__).parents[1].parent / "shared/data/corpora")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    cfg = TrainConfig(corpus_dir=args.corpus_dir, out=args.out)
    rng = random.Random(cfg.seed)  # the same draws in the same corpus order as training
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (fname, chunk_chars) in CORPORA.items():
        text = (args.corpus_dir / fname).read_text(encoding="utf-8")
        _, held = split_corpus(text, chunk_chars, cfg.holdout_frac, rng)
        path = args.out / f"{name}.txt"
        path.write_text("<|endoftext|>".join(held), encoding="utf-8")
        print(f"{path}: {len(held)} documents, {sum(map(len, held)):,} chars")


if __name__ == "__main__":
    main()
