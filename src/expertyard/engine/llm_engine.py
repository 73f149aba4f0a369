"""The step loop: scheduler.schedule() -> model_runner.run() -> sample -> postprocess; with async scheduling,
step t+1 is scheduled and launched before step t's tokens are post-processed (engine/placeholders.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from expertyard.engine.detokenizer import IncrementalDetokenizer
from expertyard.engine.kv_cache import kv_cache_bytes
from expertyard.engine.model_runner import ModelRunner
from expertyard.engine.placeholders import placeholder
from expertyard.engine.sampler import sample, top_logprobs
from expertyard.engine.sampling_params import SamplingParams
from expertyard.engine.scheduler import ScheduledSpan, ScheduledStep, Scheduler
from expertyard.engine.sequence import Sequence
from expertyard.engine.step_timer import STEP_TIMER
from expertyard.engine.step_profiler import StepProfiler
from expertyard.errors import ConfigError, RequestError
from expertyard.experts.offload.build import build_offloaded_experts, plan_budget
from expertyard.experts.offload.config import OffloadConfig
from expertyard.loader.load import LoadedModel
from expertyard.engine.grammar_masks import apply_grammars


@dataclass
class EngineConfig:
    max_num_seqs: int = 8
    """Sequences decoded together (KV cache rows)."""
    max_model_len: int | None = None
    """Longest prompt + output; default: the model's max_position_embeddings, capped at 4096."""
    max_num_batched_tokens: int = 2048
    """Tokens one step may compute; longer prompts are prefilled in chunks."""
    cuda_graphs: bool | None = None
    """Replay decode steps from CUDA graphs; default: on for CUDA devices."""
    offload: OffloadConfig | None = None
    """Experts in host memory behind a device expert cache (the model must be loaded with
    `HostLoadedExperts.factory(...)`); the engine plans the budget before it allocates the KV cache."""
    async_scheduling: bool = False
    """Schedule and launch step t+1 before reading step t's tokens, so the host's work hides behind the device's
    (a sequence that stops on a stop token computes one extra, discarded token). May be switched between steps."""

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len={self.max_model_len} must be >= 2")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")


    def resolved_max_model_len(self, limit: int) -> int:
        """max_model_len for a model of `limit` positions: as asked, default min(limit, 4096), never above limit."""
        return min(self.max_model_len or min(limit, 4096), limit)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, tokenizer, config: EngineConfig | None = None,
                 eos_token_ids: set[int] | None = None, runner: ModelRunner | None = None):
        """`runner`: what runs the model's steps (default: a ModelRunner over `loaded.model` on this process);
        any object with ModelRunner's `run(step, ...)`, e.g. the distributed runner of disagg/."""
        self.config = config or EngineConfig()
        self.model, self.model_config, self.tokenizer = loaded.model, loaded.config, tokenizer
        self.model_path = loaded.path  # the checkpoint directory (None for built models): files beside it
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_model_len = self.config.resolved_max_model_len(self.model_config.max_position_embeddings)
        cuda_graphs = self.config.cuda_graphs if self.config.cuda_graphs is not None else self.device.type == "cuda"
        self.scheduler = Scheduler(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.offload_plan = None
        if self.config.offload is not None:  # plan the whole device budget before anything is allocated
            kv = kv_cache_bytes(self.model, self.config.max_num_seqs + 1, self.max_model_len, self.dtype)
            self.offload_plan = plan_budget(self.model, self.config.offload, kv, self.max_model_len,
                                            self.config.max_num_batched_tokens, self.dtype, self.device)
            self.model.set_expert_backend(build_offloaded_experts(self.model, self.config.offload,
                                                                  self.offload_plan, loaded.path))
        self.runner = runner if runner is not None else ModelRunner(
            self.model, self.config.max_num_seqs, self.max_model_len, self.device, self.dtype, cuda_graphs)
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else _eos_ids(loaded.path, tokenizer)
        self.generators: dict[int, torch.Generator] = {}
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}  # seq_id -> its output text so far
        self.last_step = None  # the latest ScheduledStep (for logs)
        self._in_flight: _Launched | None = None  # async scheduling: the step whose tokens are not read yet
        # EXPERTYARD_PROFILE_STEPS (engine/step_profiler.py); a runner of its own (disagg/) profiles its ranks
        self._profiler = StepProfiler(0, "engine") if runner is None else None

    # ---- requests -------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | list[dict]) -> list[int]:
        """A string, token ids, or chat messages ([{"role": ..., "content": ...}]) -> prompt token ids."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if prompt and isinstance(prompt[0], dict):
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("this model's tokenizer has no chat template; send a plain prompt")
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return list(prompt)

    def add_request(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None) -> Sequence:
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                               "which must leave room for at least one generated token")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be in 0..{vocab - 1}")
        seq = Sequence(prompt_token_ids=ids, params=params)
        if params.seed is not None:
            self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(params.seed)
        if not self.scheduler.has_work():
            self.model.experts.on_sequence_start()  # per-sequence cache counters (HOBBIT) start with an idle engine
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if not seq.finished:
            self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.pending:  # a token still in flight (async scheduling): it is dropped
            seq.token_ids.pop()
            seq.pending = 0
        self.scheduler.finish(seq, reason)
        self.generators.pop(seq.seq_id, None)
        self.detokenizers.pop(seq.seq_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    # ---- the loop -------------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that got a token (finished ones have finish_reason set).

        With `async_scheduling` the step scheduled here is launched before the previous step's tokens are read,
        and the sequences returned are the previous step's: the host prepares step t+1 while the device runs
        step t (engine/placeholders.py)."""
        if self._profiler is not None:
            self._profiler.step()
        STEP_TIMER.start()
        prev, self._in_flight = self._in_flight, None
        step = self.scheduler.schedule()
        self.last_step = step
        launched = None
        if step.spans:
            STEP_TIMER.kind_of_step("prefill" if step.prefills else "decode")
            STEP_TIMER.mark("schedule")
            launched = self._launch(step, prev)
        done = self._process(prev) if prev is not None else []
        if launched is not None:
            self._commit(launched)
            if self.config.async_scheduling:
                self._in_flight = launched
            else:  # (after a switch from async, `done` holds the step that was in flight)
                done += self._process(launched)
        return done

    def _launch(self, step: ScheduledStep, prev: _Launched | None) -> _Launched:
        """Enqueue the step's model run and sampling; the tokens start their way to the host."""
        logits = self.runner.run(step, prev_tokens=prev.tokens if prev is not None else None)  # [N, V]
        STEP_TIMER.mark("run (rest)")
        sampling = [s for s in step.spans if s.samples]
        params = [s.seq.params for s in sampling]
        if any(p.grammar is not None for p in params):  # structured outputs: mask what each row's grammar forbids
            apply_grammars(logits, sampling, prev)
        tokens = sample(logits, params, [self.generators.get(s.seq.seq_id) for s in sampling])  # [N]
        want_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        on_device = [tokens]
        if want_logprobs is not None:
            on_device += top_logprobs(logits, tokens, want_logprobs)  # chosen [N], top values, top ids [N, n]
        launched = _Launched(step, sampling, tokens, *_to_host(on_device))
        STEP_TIMER.mark("sample (enqueue)")
        return launched

    def _commit(self, launched: _Launched) -> None:
        """The launched step's tokens count as computed; each sampling sequence gets a placeholder for its new
        token (real ids from the device in the next step, on the host in `_process`)."""
        for span in launched.step.spans:
            span.seq.num_computed += span.length
        for row, span in enumerate(launched.sampling):
            seq = span.seq
            if seq.finished:  # finished (a stop token, an abort) while this step was in flight
                continue
            seq.token_ids.append(placeholder(row))
            seq.pending = 1
            num_output = len(seq.token_ids) - seq.num_prompt_tokens
            # its last token by length: the scheduler gives it no further step
            seq.length_capped = num_output >= seq.params.max_tokens or len(seq.token_ids) >= self.max_model_len

    def _process(self, launched: _Launched) -> list[Sequence]:
        """Wait for the launched step's tokens on the host, write them over the placeholders, check stops."""
        if launched.ready is not None:
            launched.ready.synchronize()
        tokens, *lp = (t.tolist() for t in launched.host)
        STEP_TIMER.mark("wait for tokens")
        done = []
        for row, span in enumerate(launched.sampling):
            seq = span.seq
            if seq.finished:
                continue
            assert seq.pending and seq.token_ids[-1] == placeholder(row), "a placeholder out of step"
            seq.token_ids[-1], seq.pending = tokens[row], 0
            if seq.params.logprobs is not None:
                chosen, top_v, top_i = lp
                n = seq.params.logprobs
                seq.logprobs.append({"token": tokens[row], "logprob": chosen[row],
                                     "top": list(zip(top_i[row][:n], top_v[row][:n]))})
            self._check_finished(seq)
            done.append(seq)
        STEP_TIMER.mark("post-process")
        return done

    def _check_finished(self, seq: Sequence) -> None:
        p, token = seq.params, seq.token_ids[-1]
        reason = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        num_output = len(seq.token_ids) - seq.num_prompt_tokens  # (output_token_ids would copy the list)
        if reason is None and (num_output >= p.max_tokens or len(seq.token_ids) >= self.max_model_len):
            reason = "length"
        if self.tokenizer is not None:
            detok = self.detokenizers.get(seq.seq_id)
            if detok is None:
                detok = self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer)
            out = seq.output_token_ids
            if reason == "stop":
                out = out[:-1]  # the stop token is not part of the text
            seq.text = detok.final(out) if reason is not None else detok.update(out)
            for s in p.stop:
                if (i := seq.text.find(s)) >= 0:
                    seq.text, reason = seq.text[:i], "stop"
        if reason is not None:
            self._finish(seq, reason)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                 progress=None) -> list[Sequence]:
        """Run prompts to completion, batched; results in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        while self.has_unfinished():
            self.step()
            if progress is not None:
                progress(seqs)
        return seqs

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Log-probability of each token given the ones before it: [len - 1] float32 (eval, echo)."""
        return self.prompt_logprobs(token_ids)[0]

    @torch.inference_mode()
    def prompt_logprobs(self, token_ids: list[int], top: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities of a prompt's own tokens, each given the ones before it, and the `top` most likely
        tokens at each position: (chosen [L - 1], top values [L - 1, top], top ids [L - 1, top]), on the CPU.
        Runs in the KV cache's scratch row, so it can be called between steps while every slot is busy."""
        if len(token_ids) > self.max_model_len:
            raise RequestError(f"{len(token_ids)} tokens exceed max_model_len={self.max_model_len}")
        seq = Sequence(prompt_token_ids=list(token_ids), params=SamplingParams())
        seq.slot = self.config.max_num_seqs  # the scratch row (padded CUDA-graph rows write there only mid-step)
        chosen, values, ids = [], [], []
        for start in range(0, len(token_ids), self.config.max_num_batched_tokens):
            n = min(self.config.max_num_batched_tokens, len(token_ids) - start)
            logits = self.runner.run(ScheduledStep(prefills=[ScheduledSpan(seq, start, n)], decodes=[]),
                                     all_logits=True)  # [n, V]
            logp = logits.log_softmax(dim=-1)[: len(token_ids) - 1 - start]  # positions that predict a next token
            targets = torch.tensor(token_ids[start + 1:start + 1 + logp.shape[0]], device=logp.device)
            chosen.append(logp.gather(1, targets[:, None]).squeeze(1).float().cpu())
            top_v, top_i = logp.topk(top, dim=-1) if top > 0 else (logp[:, :0], targets[:, None][:, :0])
            values.append(top_v.float().cpu())
            ids.append(top_i.cpu())
        return torch.cat(chosen), torch.cat(values), torch.cat(ids)


def _eos_ids(model_dir: Path | None, tokenizer) -> set[int]:
    ids: set[int] = set()
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass
class _Launched:
    """A step whose model run and sampling are enqueued."""

    step: ScheduledStep
    sampling: list[ScheduledSpan]  # the spans that sample, in row order
    tokens: torch.Tensor  # [N] long on the device: what the next step's placeholders resolve to
    host: list[torch.Tensor]  # tokens [N] (and chosen, top values, top ids) on their way to the host
    ready: torch.cuda.Event | None  # recorded after the copies (None: already on the host)


def _to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Copies to pinned host memory queued on the stream (reading them must wait for the event): a plain
    .cpu() would wait for everything queued after it, the next step included."""
    if tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors], None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
