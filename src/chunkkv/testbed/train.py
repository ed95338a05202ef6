"""Training loop of the testbed model (CPU, single thread by default).

The schedule is a length curriculum: short, needle-dense sequences first (where induction
heads, the copying circuit the suite needs, form cheaply), then longer ones with more haystack so
the retrieval survives thousands of filler tokens. Every stage keeps the per-step token budget
roughly constant. Progress (loss and teacher-forced answer-token accuracy) is logged to
``train_log.jsonl`` in the output folder.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chunkkv.testbed.data import EpisodeEncoder, TrainingMixture, choice_loss, make_batch
from chunkkv.testbed.model import build_model, testbed_config
from chunkkv.testbed.tokenizer import build_tokenizer

__all__ = ["Stage", "TrainConfig", "train", "save_model"]


@dataclass
class Stage:
    """``steps`` optimizer steps on prompts of ``lengths`` tokens, ``tokens`` tokens per batch."""

    steps: int
    lengths: tuple[int, int]
    tokens: int = 8192
    max_items: int = 12


@dataclass
class TrainConfig:
    seed: int = 0
    stages: list[Stage] = field(
        default_factory=lambda: [
            Stage(600, (96, 320), 8192, 12),
            Stage(500, (256, 768), 8192, 12),
            Stage(300, (768, 1536), 8192, 8),
        ]
    )
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.01
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    rope_theta: float = 1_000_000.0
    threads: int = 1
    device: str = "cpu"
    log_every: int = 25
    max_minutes: float | None = None  # stop early (and save) past this wall time
    lm_loss: bool = True  # also train on the predictable prompt tokens (see data.EpisodeEncoder)


def save_model(model, out: Path) -> None:
    """Save weights, config, tokenizer and generation config as a standard HF folder."""
    from transformers import GenerationConfig

    from chunkkv.testbed.tokenizer import save_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(out)


def _lr(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, p)))


def train(cfg: TrainConfig, out: Path, log=print) -> Path:
    """Train from scratch with ``cfg`` and save the model folder to ``out``."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer().get_vocab_size()
    mcfg = testbed_config(
        vocab, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
        cfg.intermediate_size, cfg.rope_theta,
    )
    model = build_model(mcfg).to(cfg.device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params: {n_params:,}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    enc, mix = EpisodeEncoder(), TrainingMixture()
    total = sum(s.steps for s in cfg.stages)
    logf = open(out / "train_log.jsonl", "w")
    logf.write(json.dumps({"config": asdict(cfg), "params": n_params}) + "\n")
    t0 = time.time()
    step = 0
    acc_loss, acc_correct, acc_n = 0.0, 0, 0
    stopped = False
    for si, stage in enumerate(cfg.stages):
        mean_len = sum(stage.lengths) / 2
        for _ in range(stage.steps):
            # Answers add ~30% to the prompt length on dense episodes.
            bs = max(1, int(stage.tokens / (mean_len * 1.3)))
            batch = make_batch(rng, enc, mix, bs, stage.lengths, stage.max_items, cfg.lm_loss)
            for g in opt.param_groups:
                g["lr"] = _lr(step, total, cfg)
            if cfg.device != "cpu":
                batch.input_ids = batch.input_ids.to(cfg.device)
                batch.rows, batch.cols = batch.rows.to(cfg.device), batch.cols.to(cfg.device)
                batch.targets = batch.targets.to(cfg.device)
                batch.is_answer = batch.is_answer.to(cfg.device)
            hidden = model.model(input_ids=batch.input_ids).last_hidden_state
            # Project only the positions that carry a loss term (saves the full-vocab matmul).
            logits = model.lm_head(hidden[batch.rows, batch.cols]).unsqueeze(0)
            batch.rows = torch.zeros_like(batch.rows)
            batch.cols = torch.arange(logits.shape[1], device=logits.device)
            loss, correct = choice_loss(logits, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            acc_loss += loss.item()
            acc_correct += int(correct[batch.is_answer].sum())
            acc_n += int(batch.is_answer.sum())
            if step % cfg.log_every == 0 or step == total:
                rec = {
                    "step": step, "stage": si, "minutes": round((time.time() - t0) / 60, 2),
                    "loss": round(acc_loss / cfg.log_every, 4),
                    "answer_token_acc": round(acc_correct / max(1, acc_n), 4),
                    "lr": round(opt.param_groups[0]["lr"], 6), "batch": bs,
                    "seq_len": int(batch.input_ids.shape[1]),
                }
                log(json.dumps(rec))
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                acc_loss, acc_correct, acc_n = 0.0, 0, 0
            if cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60:
                stopped = True
                break
        model.eval()
        save_model(model, out)
        model.train()
        log(f"stage {si} done at step {step}, {(time.time() - t0) / 60:.1f} min; saved to {out}")
        if stopped:
            break
    logf.write(json.dumps({"done": True, "steps": step, "minutes": round((time.time() - t0) / 60, 2)}) + "\n")
    logf.close()
    model.eval()
    return out
