"""Write a tiny lm-eval multiple-choice task (sentence endings from TinyStories) that loads from local files,
to run lm-eval's `local-completions` against `expertyard serve` without downloading a data set.

    python benchmarks/lm_eval/make_tiny_cloze.py --text ../shared/data/corpora/tinystories-sample.txt --out /tmp/tiny_cloze
    lm_eval --model local-completions --include_path /tmp/tiny_cloze --tasks tiny_cloze --model_args ...

Each item: the first words of a sentence; choices: its true ending and the ending of another sentence.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

YAML = """task: tiny_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    text = args.text.read_text(encoding="utf-8")[:2_000_000]
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", text) if 10 <= len(s.split()) <= 25]
    rng.shuffle(sentences)
    items = []
    for words in sentences[:args.items]:
        cut = len(words) // 2
        other = rng.choice(sentences)
        choices = [" ".join(words[cut:]), " ".join(other[len(other) // 2:])]
        label = rng.randrange(2)
        if label:
            choices.reverse()
        items.append({"context": " ".join(words[:cut]), "choices": choices, "label": label})
    args.out.mkdir(parents=True, exist_ok=True)
    data = (args.out / "tiny_cloze.jsonl").resolve()
    data.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    (args.out / "tiny_cloze.yaml").write_text(YAML.format(data=data), encoding="utf-8")
    print(f"{len(items)} items -> {args.out}/tiny_cloze.yaml")


if __name__ == "__main__":
    main()
