"""Train the tiny Qwen3-MoE model that expertyard bundles as its default model.

Trains, from scratch and in one go:
  1. a byte-level BPE tokenizer (vocab 8192) on the training split, saved as a transformers tokenizer
     with a ChatML chat template;
  2. a `Qwen3MoeForCausalLM` (~16M parameters, 4 MoE layers of 16 experts, top-4) on TinyStories and
     Shakespeare, holding out 5% of each corpus to report perplexity on.

The output directory loads with `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)`, and holds `training_report.json` with the numbers.

Command used for the bundled checkpoint (one NVIDIA H200, torch 2.11, transformers 5.17, ~70 s;
see docs/bundled-model.md), whose output was then copied into src/expertyard/assets/tiny-moe/:

    PYTHONUNBUFFERED=1 python3 scripts/train_tiny_moe.py --corpus-dir .data/corpora --out /tmp/tiny-moe

(.data/corpora holds copies of tinystories-sample.txt and shakespeare-works.txt.)

CPU smoke test:

    python scripts/train_tiny_moe.py --corpus-dir /work/shared/data/corpora --max-steps 5 --out /tmp/x
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import shlex
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# corpus name -> (file name, chunk size in characters; None keeps each document whole)
CORPORA = {
    "tinystories": ("tinystories-sample.txt", None),
    "shakespeare": ("shakespeare-works.txt", 2000),
}


@dataclass
class TrainConfig:
    corpus_dir: Path
    out: Path
    seed: int = 1234
    holdout_frac: float = 0.05
    """Fraction of each corpus's documents (Shakespeare: ~2000-character chunks) held out."""
    # tokenizer
    vocab_size: int = 8192
    # model
    hidden_size: int = 256
    num_layers: int = 4
    num_experts: int = 16
    experts_per_tok: int = 4
    moe_intermediate_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 1024
    router_aux_loss_coef: float = 0.01
    # optimisation
    seq_len: int = 256
    batch_size: int = 64
    epochs: int = 16
    """~2M training tokens, so many passes; `keep_best` guards against overfitting."""
    max_steps: int | None = None
    """Stop after this many steps (the LR schedule is fitted to it); None trains `epochs` epochs."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    time_budget_s: float = 400.0
    """Shorten the run (before the cosine decay starts) if step timing projects past this."""
    evals_per_epoch: int = 2
    keep_best: bool = True
    """Save the weights of the evaluation with the lowest held-out loss rather than the last step."""
    log_every: int = 20
    experts_implementation: str | None = None
    """transformers' MoE kernel choice ("grouped_mm", "batched_mm", "eager"); None keeps its default."""
    max_shard_size: str | None = None

    def __post_init__(self):
        if not 0.0 < self.holdout_frac < 0.5:
            raise ValueError(f"{self.holdout_frac=} must be in (0, 0.5)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"{self.max_steps=} must be >= 1")
        if self.experts_per_tok > self.num_experts:
            raise ValueError(f"{self.experts_per_tok=} must be <= {self.num_experts=}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"{self.seq_len=} must be <= {self.max_position_embeddings=}")
        for name, _ in CORPORA.values():
            if not (self.corpus_dir / name).is_file():
                raise ValueError(f"corpus file {self.corpus_dir / name} not found (check --corpus-dir)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut at paragraph breaks into pieces of about `max_chars`; "".join(pieces) == text."""
    pieces, start = [], 0
    while start < len(text):
        end = start + max_chars
        if end >= len(text):
            end = len(text)
        else:
            brk = text.rfind("\n\n", start + max_chars // 2, end)
            if brk == -1:
                brk = text.rfind("\n", start + max_chars // 2, end)
            end = brk + 1 if brk != -1 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def split_corpus(text: str, chunk_chars: int | None, frac: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """Return (train, heldout) documents. Chunks of one work that stay neighbours are rejoined."""
    train, heldout = [], []
    docs = [d.strip("\n") for d in text.split(EOS)]
    docs = [d for d in docs if d.strip()]
    # units: (doc index, piece); hold-out is drawn over units so it is `frac` of the text
    units = [(i, p) for i, d in enumerate(docs) for p in (chunk_text(d, chunk_chars) if chunk_chars else [d])]
    held = set(rng.sample(range(len(units)), round(frac * len(units))))
    run: list[str] = []
    run_key = None  # (doc index, split) of the run being built
    for u, (doc_idx, piece) in enumerate(units):
        key = (doc_idx, u in held)
        if key != run_key and run:
            (heldout if run_key[1] else train).append("".join(run).strip("\n"))
            run = []
        run_key = key
        run.append(piece)
    if run:
        (heldout if run_key[1] else train).append("".join(run).strip("\n"))
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # "Once" -> no leading "Ġ"
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token="<|pad|>",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def tokenize_docs(tok: PreTrainedTokenizerFast, docs: list[str]) -> list[np.ndarray]:
    """Each document's ids followed by EOS (the document separator)."""
    encs = tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    eos = tok.eos_token_id
    return [np.array(e.ids + [eos], dtype=np.int64) for e in encs]


def pack(docs: list[np.ndarray], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate and cut into [N, seq_len] rows; the last row is padded. Returns (ids, valid mask)."""
    stream = np.concatenate(docs)
    n = math.ceil(len(stream) / seq_len)
    ids = np.full(n * seq_len, pad_id, dtype=np.int64)
    ids[: len(stream)] = stream
    valid = np.zeros(n * seq_len, dtype=bool)
    valid[: len(stream)] = True
    return torch.from_numpy(ids).view(n, seq_len), torch.from_numpy(valid).view(n, seq_len)


def train_batches(docs: list[np.ndarray], cfg: TrainConfig, rng: np.random.Generator, steps: int):
    """Yield `steps` batches [B, T]; each epoch shuffles documents, repacks, and shuffles rows."""
    done = 0
    while True:
        order = rng.permutation(len(docs))
        stream = np.concatenate([docs[i] for i in order])
        n_rows = len(stream) // cfg.seq_len
        rows = torch.from_numpy(stream[: n_rows * cfg.seq_len]).view(n_rows, cfg.seq_len)  # [N, T]
        rows = rows[torch.from_numpy(rng.permutation(n_rows))]
        for b in range(n_rows // cfg.batch_size):
            yield rows[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            done += 1
            if done == steps:
                return


# ----------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, tok: PreTrainedTokenizerFast) -> Qwen3MoeForCausalLM:
    mcfg = Qwen3MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=3 * cfg.hidden_size,  # dense MLP size; unused since every layer is MoE
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        use_cache=True,
    )
    model = Qwen3MoeForCausalLM(mcfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, valid: torch.Tensor, cfg: TrainConfig, device, amp) -> tuple[float, int]:
    """Sum of next-token cross-entropy over valid targets, and their count."""
    model.eval()
    nll, count = 0.0, 0
    for b in range(0, len(ids), cfg.batch_size):
        x = ids[b : b + cfg.batch_size].to(device)  # [B, T]
        m = valid[b : b + cfg.batch_size].to(device)
        with amp():
            logits = model(input_ids=x, use_cache=False, output_router_logits=False).logits  # [B, T, V]
        target = x[:, 1:].masked_fill(~m[:, 1:], -100)
        logits = logits[:, :-1].float().reshape(-1, logits.size(-1))  # [B * (T-1), V]
        nll += F.cross_entropy(logits, target.reshape(-1), ignore_index=-100, reduction="sum").item()
        count += int(m[:, 1:].sum())
    model.train()
    return nll, count


def heldout_report(model, heldout: dict, cfg, device, amp) -> dict[str, float]:
    """Held-out mean loss per corpus and overall (token-weighted)."""
    out, tot_nll, tot_n = {}, 0.0, 0
    for name, (ids, valid) in heldout.items():
        nll, n = evaluate(model, ids, valid, cfg, device, amp)
        out[name] = nll / n
        tot_nll, tot_n = tot_nll + nll, tot_n + n
    out["overall"] = tot_nll / tot_n
    return out


def sample(model, tok, prompt: str, device, **gen_kwargs) -> str:
    model.eval()
    x = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    with torch.no_grad():
        y = model.generate(x, max_new_tokens=60, pad_token_id=tok.pad_token_id, **gen_kwargs)
    return tok.decode(y[0], skip_special_tokens=False)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    corpus_files = ", ".join(f for f, _ in CORPORA.values())
    p.add_argument("--corpus-dir", type=Path, required=True, help=f"folder with {corpus_files}")
    p.add_argument("--out", type=Path, default=Path("src/expertyard/assets/tiny-moe"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--time-budget-s", type=float, default=TrainConfig.time_budget_s)
    p.add_argument("--no-keep-best", dest="keep_best", action="store_false")
    p.add_argument("--max-shard-size", default=None, help='e.g. "12MB" to save sharded safetensors')
    p.add_argument("--experts-implementation", default=None, choices=["grouped_mm", "batched_mm", "eager"])
    a = p.parse_args(argv)
    return TrainConfig(
        corpus_dir=a.corpus_dir, out=a.out, seed=a.seed, epochs=a.epochs, max_steps=a.max_steps,
        batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps, time_budget_s=a.time_budget_s,
        keep_best=a.keep_best, max_shard_size=a.max_shard_size, experts_implementation=a.experts_implementation,
    )  # fmt: skip


def main(argv: list[str]) -> None:
    cfg = parse_args(argv)
    t_start = time.time()
    seed_everything(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves (expert fallback)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device_name}")

    # --- data split (by document, per corpus, seeded)
    split_rng = random.Random(cfg.seed)
    splits = {}
    for name, (fname, chunk_chars) in CORPORA.items():
        text = (cfg.corpus_dir / fname).read_text(encoding="utf-8")
        train, held = split_corpus(text, chunk_chars, cfg.holdout_frac, split_rng)
        splits[name] = (train, held)
        log(f"{name}: {sum(map(len, train)):,} train chars in {len(train)} docs, "
            f"{sum(map(len, held)):,} held-out chars in {len(held)} docs")  # fmt: skip

    # --- tokenizer (training split only)
    tok = train_tokenizer([d for tr, _ in splits.values() for d in tr], cfg.vocab_size)
    probe = "Once upon a time, Lily said: \"Hello!\"\n\n  KING. What, ho! 3.14 café"
    assert tok.decode(tok(probe, add_special_tokens=False).input_ids) == probe, "tokenizer does not round-trip"

    train_docs = [ids for tr, _ in splits.values() for ids in tokenize_docs(tok, tr)]
    heldout = {  # corpus -> (ids [N, T], valid [N, T])
        name: pack(tokenize_docs(tok, held), cfg.seq_len, tok.pad_token_id) for name, (_, held) in splits.items()
    }
    train_tokens = sum(len(d) for d in train_docs)
    steps_per_epoch = train_tokens // cfg.seq_len // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"too little training text for {cfg.batch_size=} x {cfg.seq_len=}")
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    held_counts = ", ".join(f"{k} {int(v.sum()):,}" for k, (_, v) in heldout.items())
    log(f"train tokens {train_tokens:,} ({steps_per_epoch} steps/epoch); held-out tokens {held_counts}; "
        f"planned steps {total_steps}")  # fmt: skip

    # --- model
    seed_everything(cfg.seed)
    model = build_model(cfg, tok).to(device)
    if cfg.experts_implementation is not None:
        model.set_experts_implementation(cfg.experts_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_active = n_params - n_expert + n_expert * cfg.experts_per_tok // cfg.num_experts
    log(f"params {n_params:,} (experts {n_expert:,}; active per token {n_active:,}); "
        f"experts implementation {model.config._experts_implementation}")  # fmt: skip
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )  # fmt: skip

    # --- train
    data_rng = np.random.default_rng(cfg.seed)
    history, best = [], {"loss": float("inf"), "step": None, "state": None}
    model.train()
    t_train = time.time()
    step, tokens_seen = 0, 0
    recent_ce = deque(maxlen=50)  # train CE of the last steps, kept on device (no sync per step)
    probe_step = min(cfg.warmup_steps // 2, 50)
    for x in train_batches(train_docs, cfg, data_rng, total_steps):
        if step >= total_steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps, cfg)
        x = x.to(device, non_blocking=True)  # [B, T]
        with amp():
            out = model(input_ids=x, use_cache=False, output_router_logits=True)
        logits = out.logits  # [B, T, V]
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss = ce + cfg.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        recent_ce.append(ce.detach())

        if step % cfg.log_every == 0 or step == total_steps or step <= 3:
            ms = (time.time() - t_train) / step * 1000
            log(f"step {step}/{total_steps} ep {step / steps_per_epoch:.2f} ce {ce.item():.4f} "
                f"aux {out.aux_loss.item():.3f} gnorm {gnorm.item():.2f} "
                f"lr {lr_at(step - 1, total_steps, cfg):.2e} {ms:.0f} ms/step")  # fmt: skip
        if step == probe_step and cfg.max_steps is None:
            # projected time includes evals (~2x a step per held-out batch) -- shorten before decay starts
            per_step = (time.time() - t_train) / step
            fit = int(cfg.time_budget_s / (per_step * 1.15))
            if fit < total_steps:
                total_steps = max(fit, cfg.warmup_steps + 1)
                log(f"time budget {cfg.time_budget_s:.0f}s: shortening run to {total_steps} steps")
        if step % eval_every == 0 or step == total_steps:
            h = heldout_report(model, heldout, cfg, device, amp)
            history.append({"step": step, "train_ce": ce.item(), **{f"heldout_{k}": v for k, v in h.items()}})
            losses = ", ".join(f"{k} {v:.4f} (ppl {math.exp(v):.2f})" for k, v in h.items())
            log(f"eval step {step}: held-out loss {losses}")
            if cfg.keep_best and h["overall"] < best["loss"]:
                state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best = {"loss": h["overall"], "step": step, "state": state}
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.time() - t_train
    final_train_ce = torch.stack(list(recent_ce)).mean().item()
    last_step = step
    if cfg.keep_best and best["step"] != last_step:
        log(f"restoring the weights of step {best['step']} (lowest held-out loss)")
        model.load_state_dict(best["state"])
    final = heldout_report(model, heldout, cfg, device, amp)
    log("final held-out perplexity: " + ", ".join(f"{k} {math.exp(v):.2f}" for k, v in final.items()))

    story = "Once upon a time"
    samples = {
        f"greedy: {story}": sample(model, tok, story, device, do_sample=False),
        f"t=0.8: {story}": sample(model, tok, story, device, do_sample=True, temperature=0.8, top_k=0),
        "greedy: ROMEO.": sample(model, tok, "ROMEO.\n", device, do_sample=False),
    }
    for k, v in samples.items():
        log(f"sample [{k}]: {v!r}")

    # --- save (bf16 weights, inference config)
    cfg.out.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype=torch.bfloat16)
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=256
    )
    save_kwargs = {"max_shard_size": cfg.max_shard_size} if cfg.max_shard_size else {}
    model.save_pretrained(cfg.out, safe_serialization=True, **save_kwargs)
    tok.save_pretrained(cfg.out)
    weights_bytes = sum(f.stat().st_size for f in cfg.out.glob("*.safetensors"))

    report = {
        "command": " ".join(["python3", "scripts/train_tiny_moe.py", *map(shlex.quote, argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},  # fmt: skip
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "params": n_params,
        "params_experts": n_expert,
        "params_active_per_token": n_active,
        "weights_bytes": weights_bytes,
        "train_tokens_per_epoch": train_tokens,
        "steps": last_step,
        "steps_per_epoch": steps_per_epoch,
        "epochs_seen": round(last_step / steps_per_epoch, 3),
        "tokens_seen": tokens_seen,
        "saved_step": best["step"] if cfg.keep_best else last_step,
        "train_time_s": round(train_time, 1),
        "total_time_s": round(time.time() - t_start, 1),
        "final_train_loss": final_train_ce,
        "heldout_tokens": {k: int(v[:, 1:].sum()) for k, (_, v) in heldout.items()},
        "heldout_loss": final,
        "heldout_perplexity": {k: math.exp(v) for k, v in final.items()},
        "history": history,
        "samples": samples,
    }
    (cfg.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"saved to {cfg.out} ({weights_bytes / 1e6:.1f} MB of weights) in {report['total_time_s']}s")


if __name__ == "__main__":
    main(sys.argv[1:])
