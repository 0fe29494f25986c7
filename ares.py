"""ARES in one file: adaptive multimodal reasoning via difficulty-aware token-level entropy shaping.

ARES (Chen et al., arXiv 2510.08457, ICLR 2026) trains a vision-language model to think less on easy problems
and more on hard ones, in two stages:

  1. Adaptive cold start (AdaCS, --stage coldstart): supervised fine-tuning on reasoning traces whose length
     was matched to each problem's difficulty (the curation is `data_prep.py adacs`).
  2. AEPO (--stage aepo): group RL in which *high window-entropy* (HWE) tokens decide *when* to explore
     (rollouts branch there, and the KL leash is relaxed there), and a hierarchical entropy reward,
     conditioned on the online difficulty of each prompt, decides *how much* to explore.

Run it:
    python ares.py                                   # the whole method offline on a CPU demo (minutes)
    python data_prep.py demo --out data/demo         # the demo task as JSONL records; then one stage on it:
    python ares.py --stage coldstart --model tiny --data data/demo/sft.jsonl --out runs/mine
    torchrun --nproc_per_node=8 ares.py --stage coldstart --model Qwen/Qwen2.5-VL-7B-Instruct --data sft.jsonl
    torchrun --nproc_per_node=8 ares.py --stage aepo --model runs/coldstart/final --data rl.jsonl [--fsdp]
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint <node 0>:29500 ares.py ...  # 2 nodes
    python ares.py --help                            # every knob, with its default

This file has two parts. Part 1, the method, reads top to bottom in the order the algorithm runs (search for
"Eq. N"): the config -> entropy and HWE (Eq. 3, Eq. 4) -> difficulty and reward (App. G, I, M) -> KL and loss
(Eq. 1, Eq. 2) -> the sampler -> branching rollouts (§3.2) -> the cold-start loop -> the AEPO loop (Alg. 1).
Part 2, marked, is the trainer's infrastructure, which ARES does not change: distributed, model loading, the
policy's forward and batches, checkpoints, logging, flags, the demo and `main`. Files import one way:
data_prep.py (records, the grader, AdaCS, the demo task) <- ares.py <- eval.py, bench.py. "README: <row>" points
to a row of the README's table of choices, where the paper, its released code and this file differ.

Every place where the paper, its released code and this file differ, or where both are silent (the choice here is
the default):
  - Token entropy is exact over the full vocabulary from the logits (code: top-10 approximation), less the
    image and video placeholder ids, which are never sampled (README: image placeholder tokens).
  - Window entropy uses the forward window [t, t+w-1] of Eq. 4, full windows only (code: [t+1, t+w]).
  - tau = mean over ALL responses of the step, on all ranks, of each response's 0.95 entropy quantile, taken over
    the first-pass (fresh) responses only: the branches are sampled after it and are scored against it.
  - Rollouts branch at HWE windows (paper, main text); the released code never branches. G-B fresh samples,
    then up to B branches per prompt, highest window entropy first, at t >= 1 (a non-empty prefix); a branch
    trains only on its own tokens, but its N_HE, accuracy and length count the whole response, prefix included.
  - --trigger-words checks the token sampled at the window's start (decoded, stripped, lower-cased).
  - Bucket targets T_d are an EMA (momentum 0.9) over steps, fed by every group, filtered ones too; the paper's
    batch mean makes its reward zero.
  - The entropy reward has the per-bucket shape of the paper's appendix case study and of its released reward
    function (--entropy-shaping hierarchical); the main text's equation is --entropy-shaping incorrect-only
    (README: entropy reward).
  - Entropy-reward scale alpha = 0.4 (code: 0.5), so that a correct answer always outranks a wrong one.
  - KL is per token: beta0 * bucket multiplier * kappa_d * rho^(inside HWE window) (code: per sequence,
    window relaxation unreachable). kappa_d adapts to the KL measured OUTSIDE windows only (Alg. 1), on the
    kept responses during the update (first epoch), and is clipped to [0.01, 100].
  - Ratio uses pi_old, not pi_ref (Eq. 2 typo). Asymmetric clip 0.2/0.3 and dual clip 3, as released.
  - The loss is Eq. 2's mean over each response's tokens, then over the responses, with the global batch's counts
    (code: one mean over a micro-batch's tokens; --loss-agg token-mean is that mean over the global batch; README:
    loss aggregation).
  - Log-probs and entropies are those of the untruncated softmax(z / T), while sampling draws from the top-p
    nucleus (0.99): the update differentiates the full policy.
  - Alg. 1's token entropy bonus (undefined phi, b_i) and its /L_i advantage scaling are left out.
  - Groups whose accuracy is all 0 or all 1 are dropped (paper: mean reward outside [0.01, 0.99]).
    --max-refill-rounds (off): refill prompts are drawn at random, none that the step drew before; each round's rows
    are scored against that round's own tau, the one its branch points were chosen with (README: refill).
  - Answers are graded by math-verify (the released code uses mathruler), after choice-letter and string checks.
  - Cold start: lr 2e-5 with a 3% linear warm-up, then cosine decay to 10% (the paper gives no schedule); prompts up
    to 4k and traces up to 16k tokens, as in AEPO, a longer trace dropped (paper: 32k-token sequences).
  - AdaCS (data_prep.py): L(0), L(1) are medians over all traces, right and wrong; a source without a p = 0
    (p = 1) problem takes its lowest (highest) bracket; ties for the nearest trace go to the shorter one.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock


def ctrl_c_while_starting(*_):
    """A Ctrl-C in the first seconds, while torch and transformers import: one line (rank 0), not a traceback."""
    if int(os.environ.get("RANK", 0)) == 0:
        print("\ninterrupted (Ctrl-C) while starting: nothing was read or written; the same command starts it",
              file=sys.stderr, flush=True)
    os._exit(130)


EARLY_CTRL_C = __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler
if EARLY_CTRL_C:  # until main() is reached (the bottom of this file); not where Ctrl-C is ignored (nohup)
    signal.signal(signal.SIGINT, ctrl_c_while_starting)

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data_prep
from data_prep import BUCKETS, DataError, difficulty_of, encode_prompts, format_ok, tokenizer_of

warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")  # DCP, one process


# ----------------------------------------------------------------------------------------------------------
# Config: one dataclass is the single source of defaults; every field is a --flag with its help string and, for
# numbers, its allowed values (checked before anything loads: validate_config). Stage-dependent fields default to
# None and are filled from STAGE_DEFAULTS (and TINY_DEFAULTS for the CPU-sized tiny model) unless given.


def arg(default, help, choices=None, allowed=None):
    """A --flag: its default, help string, choices, and `allowed`: (what the help says, test) for numbers."""
    return field(default=default, metadata={"help": help, "choices": choices, "allowed": allowed})


AT_LEAST_1, AT_LEAST_0, ABOVE_0 = (">= 1", lambda v: v >= 1), (">= 0", lambda v: v >= 0), ("> 0", lambda v: v > 0)
IN_0_1 = ("in (0, 1]", lambda v: 0 < v <= 1)
SEED = ("in [0, 2**32)", lambda v: 0 <= v < 2**32)  # numpy's seeds
INT_LIMIT = 2**31 - 1  # the largest count or size any flag may take (a C int)
GRADER_TIMEOUT = ("in (0, 3600]", lambda v: 0 < v <= 3600)  # from 1e10 s setitimer overflows: every answer wrong
MIN_TEMPERATURE = 0.01  # lower is greedy in all but name; at 1e-40 z / T overflowed: NaN, every token the last one
SAMPLED_T = (f">= {MIN_TEMPERATURE}", lambda v: v >= MIN_TEMPERATURE)  # AEPO samples: no greedy T = 0 in training
GREEDY_OR_SAMPLED_T = (f"0 (greedy) or >= {MIN_TEMPERATURE}", lambda v: v == 0 or v >= MIN_TEMPERATURE)  # eval.py's


@dataclass
class Config:
    # AEPO rollouts: when to explore (Eq. 3, Eq. 4, §3.2)
    group_size: int = arg(8, "G: responses per prompt", allowed=(">= 2", lambda v: v >= 2))
    branch_samples: int = arg(None, "B: responses per prompt that branch at HWE windows (default G/2; 0 = off)")
    max_branches_per_response: int = arg(2, "at most this many branches from one parent response", allowed=AT_LEAST_0)
    window: int = arg(4, "w: window length of Eq. 4", allowed=AT_LEAST_1)
    entropy_quantile: float = arg(0.95, "q: per-response entropy quantile behind tau", allowed=IN_0_1)
    trigger_words: bool = arg(False, "HWE windows must also start at a reasoning word ('wait', 'however', ...)")
    temperature: float = arg(1.0, "sampling temperature (also the T of the entropy, Eq. 3)", allowed=SAMPLED_T)
    top_p: float = arg(0.99, "nucleus sampling mass", allowed=IN_0_1)
    # AEPO reward: how much to explore (App. G, I, M)
    entropy_shaping: str = arg("hierarchical", "hierarchical, incorrect-only, or none (README: entropy reward)",
                               ("hierarchical", "incorrect-only", "none"))
    entropy_coef: float = arg(0.4, "alpha: scale of the entropy reward", allowed=AT_LEAST_0)
    target_momentum: float = arg(0.9, "EMA momentum of the per-bucket N_HE targets", allowed=("in [0, 1]", lambda v: 0 <= v <= 1))
    format_weight: float = arg(0.0, "weight of the <think>...</think> + \\boxed{} format reward")
    group_filter: str = arg("accuracy", "online filter (Eq. 2): accuracy drops groups all right or all wrong; reward "
                                        "(the paper's) drops groups whose mean shaped reward is outside [0.01, 0.99]",
                            ("accuracy", "reward"))
    keep_uniform_groups: bool = arg(False, "keep every group (no online filter)")
    max_refill_rounds: int = arg(0, "dynamic sampling (DAPO): while fewer than --batch-size groups are mixed (some answers "
                                    "right, some wrong), roll out --batch-size more prompts, at most this many times "
                                    "(0 = off)", allowed=AT_LEAST_0)
    reward_fn: str = arg("", "file.py:function or module:function: fn(record, response) -> score in [0, 1] (default: the grader)")
    # AEPO KL and loss (Eq. 1, Eq. 2, Alg. 1)
    kl_coef: float = arg(0.01, "beta0: base KL weight (0 = no reference model)", allowed=AT_LEAST_0)
    kl_mode: str = arg("dynamic", "dynamic: beta0 * b_d * kappa_d * rho^m per token (Eq. 1, Alg. 1); fixed: beta0 on "
                                  "every token, no controller (plain GRPO)", ("dynamic", "fixed"))
    kl_relax: float = arg(0.5, "rho: KL weight factor inside HWE windows", allowed=AT_LEAST_0)
    kl_target: float = arg(0.01, "delta: target KL outside HWE windows for the kappa controller", allowed=ABOVE_0)
    kl_adapt_rate: float = arg(0.05, "alpha_kappa: controller step size", allowed=AT_LEAST_0)
    ref_model: str = arg("", "AEPO reference policy for the KL term (default: the starting --model)")
    clip_low: float = arg(0.2, "epsilon_low of the clipped ratio", allowed=("in [0, 1)", lambda v: 0 <= v < 1))
    clip_high: float = arg(0.3, "epsilon_high of the clipped ratio", allowed=AT_LEAST_0)
    dual_clip: float = arg(3.0, "c: dual-clip bound for negative advantages (0 = off)",
                           allowed=("0 (off) or > 1", lambda v: v == 0 or v > 1))
    adv_norm: str = arg("std", "group advantage: std ((R - mean) / std, GRPO and the paper) or mean (R - mean, Dr. GRPO)",
                        ("std", "mean"))
    loss_agg: str = arg("seq-mean-token-mean", "seq-mean-token-mean (Eq. 2) or token-mean (DAPO)",
                        ("seq-mean-token-mean", "token-mean"))
    minibatches: int = arg(None, "optimizer steps per rollout batch (paper: 4)", allowed=AT_LEAST_1)
    ppo_epochs: int = arg(1, "passes over each rollout batch", allowed=AT_LEAST_1)
    # optimisation, both stages
    lr: float = arg(None, "peak learning rate", allowed=ABOVE_0)
    weight_decay: float = arg(0.01, "AdamW weight decay", allowed=AT_LEAST_0)
    lr_schedule: str = arg(None, "after the warm-up: cosine (decay to 10%) or constant", ("cosine", "constant"))
    warmup_steps: int = arg(None, "linear warm-up steps (coldstart default: 3% of the steps)", allowed=AT_LEAST_0)
    grad_clip: float = arg(1.0, "clip the global gradient norm to this value", allowed=ABOVE_0)
    batch_size: int = arg(None, "global batch: records per step (coldstart) or prompts per step (aepo)", allowed=AT_LEAST_1)
    micro_batch_size: int = arg(None, "sequences per forward pass per rank (gradient accumulation covers the rest)",
                                allowed=AT_LEAST_1)
    epochs: int = arg(2, "coldstart epochs (ignored when --steps is given)", allowed=AT_LEAST_1)
    steps: int = arg(None, "optimizer steps (coldstart: from --epochs when unset) or AEPO rollout steps", allowed=AT_LEAST_1)
    max_prompt_len: int = arg(4096, "drop prompts longer than this many tokens (images included)", allowed=AT_LEAST_1)
    max_response_len: int = arg(None, "response tokens: SFT traces longer are dropped; AEPO max new tokens", allowed=AT_LEAST_1)
    # what to run (everything below is the trainer's, not the method's)
    stage: str = arg("demo", "demo (the whole method offline on a CPU), coldstart, or aepo", ("demo", "coldstart", "aepo"))
    model: str = arg("tiny", "hub name or local folder of a Qwen2/2.5/3-VL or causal LM; 'tiny' builds one offline")
    data: str = arg("", "JSONL, Parquet, saved Hugging Face dataset folder, or hub dataset name (README: data format); "
                        "required for coldstart and aepo")
    preset: str = arg("", "read --data with this data_prep.py preset's columns, e.g. geometry3k (default: our field names)")
    split: str = arg("train", "split to read from a Hugging Face dataset")
    out: str = arg("runs/ares", "output folder: checkpoints, metrics.jsonl")
    seed: int = arg(0, "random seed (data order, sampling)", allowed=SEED)
    resume: bool = arg(False, "continue from the newest checkpoint in --out")
    overwrite: bool = arg(False, "replace the run already in --out (its checkpoints and metrics.jsonl are deleted)")
    deterministic: bool = arg(False, "deterministic GPU kernels, so that a GPU run repeats (slower; README: determinism)")
    prompt_suffix: str = arg(None, "instruction appended to every question, saved in the checkpoint's config.json for "
                                   "eval.py and passrate (default: the model's own, else the authors' (README: paper "
                                   "settings); --model tiny: none); saved in <out>/config.json")
    # model, memory and speed
    dtype: str = arg("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 (evaluation only: training "
                     "in fp16 would need loss scaling) or fp32",
                     ("auto", "bf16", "fp16", "fp32"))
    attn: str = arg("sdpa", "attention kernel: sdpa, eager, or flash_attention_2 (if installed)",
                    choices=["sdpa", "eager", "flash_attention_2"])
    min_pixels: int = arg(56 * 56, "smallest image area after resizing", allowed=AT_LEAST_1)
    max_pixels: int = arg(1280 * 28 * 28, "largest image area after resizing (caps image tokens)",
                          allowed=(">= --min-pixels", None))
    grad_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    compile: bool = arg(False, "torch.compile the sampler's decode step on a KV pool (CUDA graphs on a GPU) and the cold "
                               "start's decoder layers, each once per run (README: compile)")
    compile_backend: str = arg("inductor", "torch.compile backend of --compile; aot_eager or eager trace and check "
                                           "recompiles without generating code (fast on a CPU)", ("inductor", "aot_eager", "eager"))
    fsdp: bool = arg(False, "shard policy and reference with FSDP2 fully_shard instead of DDP")
    train_vision: bool = arg(False, "also train the vision tower and merger (paper: frozen)")
    rollout_batch: str = arg("auto", "most responses decoded at once per rank: an integer, or auto: what the free device "
                                     "memory holds in KV cache at --max-prompt-len + --max-response-len tokens a row, "
                                     "beside what the update will add (README: memory plan)")
    lora_rank: int = arg(0, "train LoRA adapters of this rank (needs peft) instead of all weights; 0 = full training; "
                            "checkpoints hold the merged model and <ckpt>/adapter/ (README: LoRA)", allowed=AT_LEAST_0)
    lora_alpha: float = arg(None, "LoRA alpha: the adapters are scaled by alpha / rank (default: 2 x rank)", allowed=ABOVE_0)
    lora_targets: str = arg("all-linear", "the language model's layers with adapters: all-linear (peft's: all but the "
                                          "output head), or names: q_proj,v_proj")
    dist_timeout: int = arg(1800, "seconds a collective waits for the other ranks before the job fails (a dead rank)",
                            allowed=AT_LEAST_1)
    # logging, checkpoints, validation, grading
    save_every: int = arg(50, "save a checkpoint every N optimizer steps (and at the end)", allowed=AT_LEAST_1)
    keep_last: int = arg(2, "keep only the newest N step checkpoints", allowed=AT_LEAST_1)
    log_samples_every: int = arg(10, "print one sampled response every N AEPO steps", allowed=AT_LEAST_0)
    report_to: str = arg("none", "also log the metrics.jsonl rows to tensorboard or wandb", ("none", "tensorboard", "wandb"))
    eval_data: str = arg("", "held-out records (file, folder or data_prep preset) to validate on during AEPO (default: none)")
    eval_every: int = arg(None, "validate on --eval-data every N AEPO steps and at the last (greedy; 0 = never; "
                                "default: at every --save-every with --eval-data, else never)", allowed=AT_LEAST_0)
    grader_timeout: float = arg(3.0, "seconds one answer's math check may take before it is graded wrong",
                                allowed=GRADER_TIMEOUT)
    grader_workers: int = arg(4, "processes that grade a step's answers in parallel (0 = in this process)", allowed=AT_LEAST_0)
    # demo (stage demo only)
    demo_steps: int = arg(None, "a quick demo on a smaller task: N AEPO steps, the warm-up and the cold start 5N each "
                               "(default: the full demo, DEMO_STEPS: 800 / 300 / 100)",
                          allowed=AT_LEAST_1)
    # not a flag: the flags given on the command line, so that an explicit value wins even when it equals the default
    given: tuple = field(default=(), repr=False)


FLAG_NAMES = [f.name for f in dataclasses.fields(Config)]
STAGE_FLAGS = {  # flags one stage alone reads: given with another stage, resolve_stage_defaults refuses them
    "aepo": frozenset(FLAG_NAMES[:FLAG_NAMES.index("lr")]  # Config's AEPO sections, then validation and grading
                      + ["eval_data", "eval_every", "log_samples_every", "grader_timeout", "grader_workers"]),
    "coldstart": frozenset({"epochs"}),
    "demo": frozenset({"demo_steps"}),
}


STAGE_DEFAULTS = {  # the paper's settings (README: paper settings): AEPO, and the AdaCS cold start
    "coldstart": dict(lr=2e-5, lr_schedule="cosine", batch_size=256, micro_batch_size=1, max_response_len=16384,
                      minibatches=1),
    "aepo": dict(lr=1e-6, lr_schedule="constant", batch_size=512, micro_batch_size=2, max_response_len=16384, steps=250,
                 minibatches=4, warmup_steps=0),
}


TINY_DEFAULTS = {  # CPU-sized: the tiny model learns the demo task in minutes
    "coldstart": dict(lr=2e-3, batch_size=32, micro_batch_size=32, max_response_len=128, steps=800,
                      max_prompt_len=256, warmup_steps=20, lr_schedule="constant"),  # reading is learned late
    "aepo": dict(lr=1e-4, batch_size=16, micro_batch_size=64, max_response_len=128, steps=150, minibatches=1,
                 max_prompt_len=256, warmup_steps=0, save_every=50, window=1),  # w=1: see README, demo
}



# ----------------------------------------------------------------------------------------------------------
# Entropy and high-window-entropy tokens (Eq. 3, Eq. 4, paper §3.2.1): the "when to explore" signal.


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """Eq. 3: H = -sum_v p_v log p_v with p = softmax(z / T), over the full vocabulary, in float32, natural log.
    logits (..., V) -> (...). Processed `chunk` rows at a time, so a float32 copy of the whole logits tensor
    is never made (8 x 4096 x 151,936 logits in float32 would be 20 GB)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if len(flat) <= chunk:  # one chunk (a decode step's rows): no loop, so torch.compile keeps the row count dynamic
        return torch.special.entr(torch.softmax(flat.float() / temperature, -1)).sum(-1).reshape(logits.shape[:-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], chunk):
        z = flat[s:s + chunk].float() / temperature
        out[s:s + chunk] = torch.special.entr(torch.softmax(z, -1)).sum(-1)  # -p log p, 0 where p = 0
    return out.reshape(logits.shape[:-1])


def window_entropy(H: torch.Tensor, mask: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: Hbar_t = (1/w) sum_{tau=t}^{t+w-1} H_tau, forward window, full windows only.
    H, mask (N, R) with each response's tokens contiguous from position 0. Returns Hbar (N, R) and valid (N, R):
    valid[i, t] iff t + w <= L_i, and Hbar is 0 where not valid. Example: H = [1, 2, 3, 4, 5], w = 2 ->
    Hbar = [1.5, 2.5, 3.5, 4.5, 0], valid for t <= 3."""
    R = H.shape[1]
    hbar = F.pad(H * mask, (0, w - 1)).unfold(1, w, 1).mean(-1)  # (N, R); a direct sum: a long cumsum drifts
    valid = (torch.arange(R, device=H.device)[None] + w) <= mask.sum(1, keepdim=True)
    return hbar * valid, valid


def hwe_threshold(H: torch.Tensor, mask: torch.Tensor, q: float = 0.95) -> float:
    """tau (§3.2.1): each response's q-quantile of its token entropies (linear interpolation, as numpy), then
    the mean over all responses of the step on ALL ranks. H, mask (N, R) -> float."""
    n = mask.sum(1)  # (N,)
    s = torch.where(mask, H.float(), torch.inf).sort(1).values  # real entries first, ascending
    pos = q * (n - 1).clamp(min=0).float()
    lo, hi = pos.floor().long().clamp(max=H.shape[1] - 1), pos.ceil().long().clamp(max=H.shape[1] - 1)
    qv = s.gather(1, lo[:, None]).squeeze(1)
    qv = qv + (pos - lo) * (s.gather(1, hi[:, None]).squeeze(1) - qv)
    has = n > 0
    stats = torch.tensor([torch.where(has, qv, 0.0).sum().item(), has.sum().item()], dtype=torch.float64)
    all_reduce(stats)
    return (stats[0] / stats[1]).item() if stats[1] > 0 else float("inf")


TRIGGER_WORDS = ("wait", "however", "but", "alternatively", "hmm", "check", "verify", "actually", "perhaps",
                 "maybe", "instead", "recheck", "double-check", "reconsider", "although", "yet", "suppose", "oh")


def trigger_table(processor, vocab_size: int) -> torch.Tensor:
    """(V,) bool: token v decodes (stripped, lower-cased) to one of TRIGGER_WORDS (the paper's appendix and released
    code: "validated" windows, optional, --trigger-words)."""
    tok = tokenizer_of(processor)
    words = set(TRIGGER_WORDS)
    table = torch.zeros(vocab_size, dtype=torch.bool)
    for v in range(min(vocab_size, len(tok))):
        table[v] = tok.decode([v]).strip().lower() in words
    return table


def hwe_mask(hbar: torch.Tensor, valid: torch.Tensor, tau, tokens: torch.Tensor | None = None,
             triggers: torch.Tensor | None = None) -> torch.Tensor:
    """HWE mask (§3.2.1): m_{i,t} = 1[Hbar_{i,t} >= tau] on full windows; with `triggers` the sampled token at t
    must also be a reasoning word. (N, R) -> (N, R) bool. N_HE(i) = m[i].sum(). tau: a float, or (N, 1) one per row,
    compared in hbar's dtype either way (a branch point chosen against a float is HWE against the same tau as a
    tensor)."""
    m = valid & (hbar >= torch.as_tensor(tau, dtype=hbar.dtype))
    if triggers is not None:
        m &= triggers.to(tokens.device)[tokens]
    return m



# ----------------------------------------------------------------------------------------------------------
# Difficulty and the hierarchical entropy reward (paper App. G, I, M): "how much to explore". The section ends
# with the GRPO advantages of those rewards (Eq. 2), which the loss below takes.


# App. I, M and the released reward function (README: entropy reward), per bucket: margin f, Huber kappa,
# sigmoid scale s, cap scale c, wrong-answer scale u
SHAPING = torch.tensor([[0.15, 2.0, 2.0, 1.0, 0.6], [0.25, 3.0, 2.5, 1.0, 0.8], [0.35, 4.0, 3.0, 1.2, 1.0]],
                       dtype=torch.float64)


def difficulty_buckets(acc: torch.Tensor, group_size: int) -> torch.Tensor:
    """App. G, from the group's accuracy p: easy (0) if p >= 2/3, medium (1) if p >= 1/3, else hard (2).
    acc (N,) in {0, 1} (or --reward-fn scores in [0, 1]), groups of G consecutive responses -> (N,) bucket per
    response. Compared as 3 * sum >= 2G (easy) and 3 * sum >= G (medium), exact for 0/1, so that G = 8 gives easy =
    6-8 correct, medium = 3-5, hard = 0-2. Example, G = 4: acc [1, 1, 0, 0, 1, 0, 0, 0] -> [1, 1, 1, 1, 2, 2, 2, 2]
    (2 of 4 right: medium; 1 of 4: hard)."""
    correct = rearrange(acc.double(), "(p g) -> p g", g=group_size).sum(1)  # (P,)
    return difficulty_of(correct, group_size).long().repeat_interleave(group_size)  # 3 * correct vs G and 2G


def bucket_sums(values: list[torch.Tensor], index: torch.Tensor, n: int = 3) -> torch.Tensor:
    """This rank's sum of each (N,) tensor of `values` per index (N,) in [0, n): (len(values), n) float64. The
    callers all_reduce it. bucket_sums([ones, x], bucket) holds each bucket's count and its sum of x."""
    out = torch.zeros(len(values), n, dtype=torch.float64)
    for k, v in enumerate(values):
        out[k].index_add_(0, index.cpu(), v.double().cpu())
    return out


def bucket_means(values: torch.Tensor, bucket: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (all ranks) mean of `values` per bucket -> (means (3,), counts (3,)); mean is NaN where empty."""
    stats = all_reduce(bucket_sums([values, torch.ones_like(values)], bucket))
    return stats[0] / stats[1], stats[1]


def update_targets(targets: torch.Tensor, n_he: torch.Tensor, bucket: torch.Tensor, momentum: float = 0.9):
    """Per-bucket N_HE targets T_d (App. I, M; README: N_HE target T_d). targets (3,) float64, NaN = never seen.
    Returns (targets used for THIS step's rewards, targets after the EMA update): a bucket seen before uses its
    previous target; a bucket seen for the first time uses its current global mean."""
    means, counts = bucket_means(n_he, bucket)
    seen_now = counts > 0
    for_reward = torch.where(torch.isnan(targets) & seen_now, means, targets)
    new = torch.where(seen_now, torch.where(torch.isnan(targets), means, momentum * targets + (1 - momentum) * means),
                      targets)
    return for_reward, new


def huber(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Hub(x) = x^2 / (2k) for x <= k, else x - k/2 (x >= 0)."""
    return torch.where(x <= k, x * x / (2 * k), x - k / 2)


def entropy_shaped_reward(acc: torch.Tensor, n_he: torch.Tensor, bucket: torch.Tensor, targets: torch.Tensor,
                          mode: str = "hierarchical", alpha: float = 0.4) -> torch.Tensor:
    """R_i = acc_i + E_i (App. I, M; README: entropy reward). acc, n_he, bucket (N,); targets (3,) = T_d used this
    step. -> (N,) float64. "correct" is acc > 0 (a --reward-fn's partial score counts as correct), "wrong" acc = 0.
    Delta = N_HE - T_d; m = max(1, f * max(T_d, 1)); cap = alpha * c:
      correct easy    -min(cap, Hub(max(Delta - m, 0)) / (m + k) * cap)        too much exploring costs
      correct medium  -min(cap, Hub(max(|Delta| - m, 0)) / (m + k) * cap)      stay near the target
      correct hard    +sig(Delta + m) * cap if Delta >= -m else -min(cap, 0.5 Hub(-Delta - m) / (m + k) * cap)
      wrong (any)     +sig(max(Delta - m, 0)) * cap * u                         mild push to explore
    with sig(x) = 1 / (1 + exp(-x / s)). 'incorrect-only' is the paper's main-text form, 'none' is R = acc.
    Example, easy bucket (f 0.15, k 2, s 2, c 1, u 0.6), T = 3, alpha = 0.4, so m = 1 and cap = 0.4: acc [1, 1, 0],
    n_he [3, 9, 9] -> [1.0, 0.6, 0.222]: right near the target keeps 1; right with Delta = 6 pays the whole cap
    (Hub(5) / 3 * 0.4 = 0.53 > 0.4); wrong gets sig(5) * 0.4 * 0.6 = 0.222, still below any right answer."""
    acc, n_he = acc.double(), n_he.double()
    T = targets.double()[bucket]  # (N,)
    delta = n_he - T
    if mode == "none":
        return acc
    if mode == "incorrect-only":
        g = torch.stack([delta.clamp(min=0), delta.abs(), (-delta).clamp(min=0)], 1).gather(1, bucket[:, None])[:, 0]
        return acc - (acc == 0).double() * alpha * (g / T.clamp(min=1)).clamp(max=1)  # only a wrong answer (score 0) pays
    f, k, s, c, u = SHAPING[bucket].unbind(1)  # (N,) each
    m = (f * T.clamp(min=1)).clamp(min=1)
    cap = alpha * c
    over = -torch.minimum(cap, huber((delta - m).clamp(min=0), k) / (m + k) * cap)
    near = -torch.minimum(cap, huber((delta.abs() - m).clamp(min=0), k) / (m + k) * cap)
    hard = torch.where(delta >= -m, torch.sigmoid((delta + m) / s) * cap,
                       -torch.minimum(cap, 0.5 * huber((-delta - m).clamp(min=0), k) / (m + k) * cap))
    correct = torch.stack([over, near, hard], 1).gather(1, bucket[:, None])[:, 0]
    wrong = torch.sigmoid((delta - m).clamp(min=0) / s) * cap * u
    return acc + torch.where(acc > 0, correct, wrong)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, std: bool = True) -> torch.Tensor:
    """The advantage A_i of Eq. 2 (GRPO): (R_i - mean_G R) / (std_G R + eps), unbiased std within each group of G
    consecutive responses; std=False: R_i - mean_G R (Dr. GRPO, --adv-norm mean: a group whose rewards differ only a
    little, as an all-right group's shaped rewards do, keeps a small advantage instead of one of size 1)."""
    r = rearrange(rewards, "(p g) -> p g", g=group_size).double()  # (P, G)
    centred = r - r.mean(1, keepdim=True)
    return (centred / (r.std(1, keepdim=True) + eps) if std else centred).view(-1)


def group_mean(x: torch.Tensor, G: int) -> torch.Tensor:
    return rearrange(x, "(p g) -> p g", g=G).float().mean(1)



# ----------------------------------------------------------------------------------------------------------
# Dynamic KL (Eq. 1, Alg. 1) and the AEPO objective (Eq. 2).


KL_BUCKET_SCALE = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)  # b_d: tight on easy, loose on hard (Eq. 1, Alg. 1)


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) at sampled tokens: exp(d) - d - 1 with d = logp_ref - logp
    (d clamped to +-20, result to <= 10). Always >= 0; its mean over samples from pi is the true KL (before the
    clamps)."""
    d = (logp_ref - logp).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(max=10)


def kl_weights(hwe: torch.Tensor, bucket: torch.Tensor, kappa: torch.Tensor, beta0: float, relax: float) -> torch.Tensor:
    """Eq. 1 / Alg. 1: beta_{i,t} = beta0 * b_d * kappa_d * rho^{m_{i,t}}. hwe (N, R) bool, bucket (N,),
    kappa (3,) -> (N, R) float32: the KL leash is looser (rho < 1) inside high-entropy windows."""
    per_seq = beta0 * KL_BUCKET_SCALE.to(kappa)[bucket] * kappa[bucket]  # (N,)
    return (per_seq[:, None] * torch.where(hwe, relax, 1.0)).float()


def update_kl_controller(kappa: torch.Tensor, kl_outside: torch.Tensor, seen: torch.Tensor, target: float = 0.01,
                         rate: float = 0.05) -> torch.Tensor:
    """Alg. 1 / App. K/L: kappa_d <- clip(kappa_d * (1 + rate * clip(KL_out_d / target - 1, -1, 1)), 0.01, 100),
    for each bucket d where `seen` (3,) bool: one whose KL outside windows was measured this step (aepo_update).
    kl_outside (3,): global mean KL outside HWE windows per bucket."""
    e = (kl_outside / target - 1).clamp(-1, 1)
    return torch.where(seen, (kappa * (1 + rate * e)).clamp(0.01, 100), kappa)


def aepo_loss(logp, logp_old, logp_ref, adv, kl_w, mask, agg: str, denom: float, clip_low: float = 0.2,
              clip_high: float = 0.3, dual_clip: float = 3.0):
    """Eq. 2 with asymmetric and dual clipping (as released), plus the token-weighted KL of Eq. 1.
    logp, logp_old, logp_ref, kl_w, mask (N, R); adv (N,). Per token:
        l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)),  r = exp(logp - logp_old)
        l = min(l, -c A) where A < 0 (c = 0: no dual clip),   then  l + beta_{i,t} * k3(logp, logp_ref)
    Aggregation divides by a GLOBAL count `denom` (all micro-batches and ranks of the optimizer step):
        seq-mean-token-mean: sum_i (sum_t l_it / L_i) / denom, denom = responses in the step, L_i = row i's
                             loss tokens (mask: for a branch its own tokens, not the parent's prefix)
        token-mean:          sum_{i,t} l_it / denom,          denom = loss tokens in the step
    so that summing the returned losses over micro-batches (and averaging gradients over ranks after
    multiplying by the world size) gives exactly the full-batch objective. Returns (loss, stats). Example, one
    response, r = [2, 1] (logp = log [.5, .5], logp_old = log [.25, .5]), no KL, denom 1: A = +1 -> l = [-1.3, -1]
    (the first ratio clipped at 1 + 0.3), loss -1.15; A = -1 -> l = [2, 1] (under the dual-clip bound 3), loss 1.5."""
    mask = mask.float()
    ratio = torch.exp(logp - logp_old)
    a = adv[:, None].to(logp)
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip:
        pg = torch.where(a < 0, torch.minimum(pg, -dual_clip * a), pg)
    kl = k3_kl(logp, logp_ref) if logp_ref is not None else torch.zeros_like(logp)
    per_token = pg + kl_w * kl
    if agg == "token-mean":
        loss = (per_token * mask).sum() / denom
    else:
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / denom
    with torch.no_grad():
        clipped = ((ratio < 1 - clip_low) & (a < 0)) | ((ratio > 1 + clip_high) & (a > 0))
        stats = dict(clip_frac=(clipped.float() * mask).sum().item(), kl=(kl * mask).sum().item(), tokens=mask.sum().item())
    return loss, stats



# ----------------------------------------------------------------------------------------------------------
# Sampler: a batched decoding loop over the HF model with a KV cache. An AEPO step samples first and then applies the
# formulas above; the sampler and the rollouts come after them as machinery, and train_aepo runs a step in order.
# At each decoding step it records the sampled token, its log-prob under softmax(z / T) (the policy the update
# differentiates) and its entropy (Eq. 3) over the full vocabulary less the image/video placeholders (banned_tokens).
# Finished rows are dropped from the batch as they accumulate. The model side is here too: prompts into a KV cache
# (prefill, prompt_batch) and each distinct image through the vision tower once.
# The KV caches themselves are infrastructure (Part 2): EagerKV, and with --compile the run's KVPool.


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor):
    """One decoding step. logits (B, V), u (B,) uniform noise -> token (B,), log-prob (B,), entropy (B,).
    Sampling is by inverse CDF over the top-p nucleus (the smallest set of most likely tokens whose mass
    reaches top_p); the log-prob and entropy (Eq. 3) are those of the untruncated softmax(z / T). T = 0 is greedy
    (log-prob and entropy at T = 1)."""
    logp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), -1)  # (B, V)
    probs = logp.exp()
    if temperature <= 0:
        tok = logp.argmax(-1)
    else:
        if top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            sp = sp * ((sp.cumsum(-1) - sp) < top_p)  # keep a token if the mass before it is < top_p
        else:
            sp, si = probs, None
        cdf = sp.cumsum(-1)
        j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        tok = (si.gather(-1, j) if si is not None else j).squeeze(-1)
    # softmax(logp) = p; one chunk of all B rows (their float32 copy exists already): a chunk loop would fix B under
    # torch.compile, whose KV pool marks it dynamic (an error past 1,024 rows)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1), token_entropy(logp, chunk=max(len(logp), 1))


def banned_tokens(model) -> list[int]:
    """Image/video placeholder ids: a response must never contain one (the model would look for a matching image),
    so the policy's distribution excludes them, in sampling and in training alike."""
    config = model.config
    return [i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)) if i is not None]


def without_banned(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """logits (..., V) with the banned ids (a device tensor, made once per call of the sampler or the policy) at -inf."""
    return logits if banned is None else logits.index_fill(-1, banned, float("-inf"))


@torch.no_grad()
def sample(model, prompts: list[dict], *, ids: dict, max_new_tokens: int = 0, budgets: list[int] | None = None,
           prefixes: list[list[int]] | None = None, repeats: int = 1, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, pool=None, prefill_tokens: int | None = None) -> dict:
    """Sample `repeats` continuations of each prompt (+ optional token prefix), prompt-major order.
    prompts: encode_prompts() dicts; budgets: new-token limit per output row (default max_new_tokens).
    Returns tokens, logprobs, entropy (N, T) and mask (N, T) bool of the sampled tokens (EOS included, padding
    after it), plus truncated (N,) bool (hit its budget without EOS). N = len(prompts) * repeats.
    Each prompt is prefilled once (vision tower included). Eager (pool=None): its KV cache is copied `repeats`
    times and rows that finished leave the batch once a quarter of it is done (EagerKV). pool (--compile): the run's
    KVPool takes the prompts' keys and values and decodes with a step compiled once per run (CUDA graphs on a GPU)
    on a fixed set of row counts: finished rows leave by moving to a smaller one. Both paths draw the same noise for
    row i at step t, so they sample the same tokens up to floating-point ties. Rows sharing a prompt dict share its
    images. prefill_tokens: the most (padded) tokens of one prefill forward (prefill)."""
    device = next(model.parameters()).device
    prefixes = prefixes or [[]] * len(prompts)
    N = len(prompts) * repeats
    budgets = torch.tensor(budgets if budgets is not None else [max_new_tokens] * N, device=device)
    if pool is not None:  # fits, before any forward
        pool.check(torch.tensor([len(p["ids"]) + len(x) for p, x in zip(prompts, prefixes)],
                                device=device).repeat_interleave(repeats), budgets)
    state = prefill(model, prompts, prefixes, ids, repeats, prefill_tokens, pool)
    kv = pool.start(model, state, budgets) if pool is not None else EagerKV(state, repeats)
    return decode(model, state, kv, budgets, ids, temperature, top_p, generator)


def prefill(model, prompts: list[dict], prefixes: list[list[int]], ids: dict, repeats: int,
            max_tokens: int | None = None, pool=None) -> dict:
    """Run every prompt (+ prefix) through the model once, left-padded, into a KV cache. -> cache (P rows),
    att (P, L) its attention mask, logits (N, V) of the last position and next_pos (N,) the position of the first
    new token (each prompt's repeated), vlm (3-D rotary positions). With max_tokens, the rows go through in parts of
    at most that many (padded) tokens, every part padded to the longest row, and their keys and values are copied into
    one cache: a forward's activations grow with its tokens, and a branch call's rows carry long prefixes. With a
    KVPool, each part goes into the pool as it is computed (KVPool.write), and cache is None."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    P, L = len(prompts), max(max(len(p["ids"]) + len(x) for p, x in zip(prompts, prefixes)), 1)
    per = P if not max_tokens else max(1, max_tokens // L)  # rows per forward
    full, logits, att, next_pos = None, [], [], []
    for s in range(0, P, per):
        batch = prompt_batch(model, prompts[s:s + per], prefixes[s:s + per], ids, device, length=L)  # (p, L)
        inputs = dict(model_inputs(batch), **encode_images(model, batch))
        cache = DynamicCache(config=model.config.get_text_config())
        logits.append(model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1])  # (p, V)
        att.append(batch["attention_mask"])
        next_pos.append(batch["next_pos"])
        if pool is not None:
            pool.write(cache, att[-1], s * repeats, repeats)
            cache = None
        elif per < P:  # each layer's keys and values (p, kv heads, L, head dim) into the (P, ...) whole
            full = full or [[x.new_empty(P, *x.shape[1:]) for x in (layer.keys, layer.values)] for layer in cache.layers]
            for (K, V), layer in zip(full, cache.layers):
                K[s:s + per], V[s:s + per] = layer.keys, layer.values
            del cache
    if full is not None:  # update copies each layer's whole: it leaves `full` first, so the call's KV exists once
        cache = DynamicCache(config=model.config.get_text_config())
        for i in range(len(full)):
            (K, V), full[i] = full[i], None
            cache.update(K, V, i)
            del K, V
    return dict(cache=cache, att=torch.cat(att), logits=torch.cat(logits).repeat_interleave(repeats, 0),
                next_pos=torch.cat(next_pos).repeat_interleave(repeats, 0), vlm=batch["position_ids"].dim() == 3)


def prompt_batch(model, prompts: list[dict], prefixes: list[list[int]], ids: dict, device, length: int = 1) -> dict:
    """Prompts (+ token prefixes) left-padded, so every row's last token is at the end: input_ids, attention_mask
    (P, L) (L at least `length`), position_ids (3, P, L) for Qwen-VL's 3-D rotary positions else (P, L),
    mm_token_type_ids, the distinct images (gather_images), and next_pos (P,): the position of the first token after
    each row."""
    input_ids, att = pad([torch.cat([p["ids"], torch.tensor(x, dtype=torch.long)]) for p, x in zip(prompts, prefixes)],
                         ids["pad"], left=True, length=length)  # (P, L)
    images = gather_images(prompts)
    pos = position_ids(model, input_ids, att.long(), images["row_grid_thw"])
    batch = dict(input_ids=input_ids, attention_mask=att.long(), position_ids=pos, **images,
                 next_pos=(pos.amax(dim=(0, 2)) if pos.dim() == 3 else pos.amax(-1)) + 1)
    if ids["image"] is not None:
        batch["mm_token_type_ids"] = (input_ids == ids["image"]).int()
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids")
            if batch.get(k) is not None}


def encode_images(model, images: dict) -> dict:
    """Model inputs for gather_images() output: the vision tower runs once per distinct image, and each row
    gets its features (the model places them at its <|image_pad|> tokens). Qwen3-VL also adds features of
    inner vision layers to early decoder layers (its `deepstack_features`): they are re-indexed the same way.
    A frozen tower (paper; no --train-vision) runs without gradients: nothing to recompute or differentiate."""
    if images.get("pixel_values") is None:
        return {}
    base, index = model.model, images["image_index"]
    with torch.set_grad_enabled(tower_trains(base)):
        out = base.get_image_features(images["pixel_values"].to(base.visual.dtype), images["image_grid_thw"])
    out.pooler_output = [out.pooler_output[j] for j in index]  # one tensor per image: (tokens, H)
    if getattr(out, "deepstack_features", None) is not None:  # per vision layer, one tensor per image
        out.deepstack_features = [[layer[j] for j in index] for layer in out.deepstack_features]
    return {"mm_encoder_outputs": {"image": out}}


def tower_trains(base: nn.Module) -> bool:
    """Whether this forward differentiates the vision tower: grad enabled and --train-vision."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in base.visual.parameters())


def next_positions(next_pos: torch.Tensor, steps: int, vlm: bool) -> torch.Tensor:
    """Rotary positions of the `steps` tokens after each row's next_pos (N,): (3, N, steps) for Qwen-VL (text
    tokens advance t, h and w alike), else (N, steps)."""
    p = next_pos[:, None] + torch.arange(steps, device=next_pos.device)  # (N, steps)
    return p[None].expand(3, -1, -1) if vlm else p


CHECK_EVERY = 8  # decode steps between looks at which rows are done: the loop's only waits for the device


def decode(model, state: dict, kv, budgets: torch.Tensor, ids: dict, temperature: float, top_p: float,
           generator) -> dict:
    """The decoding loop from prefill()'s state: sample a token per live row, feed it through `kv` (EagerKV or
    the KVPool), until every row has sampled a stop token or spent its budget (N,). Every CHECK_EVERY steps it
    stops if no row is live and lets `kv` drop finished rows. kv.rows: the output row of each batch row (N for a
    padding row of a pool bucket: it writes to a spare row)."""
    device = budgets.device
    N, T = len(budgets), int(budgets.max()) if len(budgets) else 0
    tokens = torch.full((N + 1, max(T, 1)), ids["pad"], dtype=torch.long, device=device)  # (N + 1, T)
    logps, ents = torch.zeros(N + 1, max(T, 1), device=device), torch.zeros(N + 1, max(T, 1), device=device)
    mask = torch.zeros(N + 1, max(T, 1), dtype=torch.bool, device=device)  # (N + 1, T)
    stop, budgets = torch.tensor(ids["stop"], device=device), torch.cat([budgets, budgets.new_zeros(1)])  # (N + 1,)
    banned = torch.tensor(banned_tokens(model), device=device).view(-1) if banned_tokens(model) else None
    rows = kv.rows  # (B,)
    src = rows.clamp(max=max(N - 1, 0))  # a padding row reads row N - 1's inputs: it is never live
    next_pos, live = state["next_pos"][src], budgets[rows] > 0  # (B,) each
    tok, lp, H = sample_token(without_banned(state["logits"][src], banned), temperature, top_p,
                              torch.rand(N, generator=generator, device=device)[src])
    for t in range(T):
        tokens[rows, t] = torch.where(live, tok, ids["pad"])  # masked writes: no host sync per step
        logps[rows, t], ents[rows, t], mask[rows, t] = torch.where(live, lp, 0.0), torch.where(live, H, 0.0), live
        live = live & ~torch.isin(tok, stop) & (t + 1 < budgets[rows])
        if t + 1 == T:
            break
        if t % CHECK_EVERY == CHECK_EVERY - 1:
            if not live.any():
                break
            keep = kv.keep(live, t)
            if keep is not None:
                rows, tok, next_pos, live = rows[keep], tok[keep], next_pos[keep], live[keep]
        u = torch.rand(N, generator=generator, device=device)[rows.clamp(max=N - 1)]
        p = next_positions(next_pos + t, 1, state["vlm"])
        tok, lp, H = (x.clone() for x in kv.step(model, tok, p, u, t, temperature, top_p, banned))
    tokens, logps, ents, mask, budgets = tokens[:N], logps[:N], ents[:N], mask[:N], budgets[:N]
    lengths = mask.sum(1)
    last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    truncated = (lengths >= budgets) & ~torch.isin(last, stop)
    Tu = max(int(lengths.max()) if N else 0, 1)
    return dict(tokens=tokens[:, :Tu].cpu(), logprobs=logps[:, :Tu].cpu(), entropy=ents[:, :Tu].cpu(),
                mask=mask[:, :Tu].cpu(), truncated=truncated.cpu())



# ----------------------------------------------------------------------------------------------------------
# HWE-triggered branching rollouts (paper §3.2): explore where the model is uncertain.


@dataclass
class Rollouts:
    """One step's responses: N = P * G rows, prompt-major; prompt p's fresh samples are rows p*G .. p*G + G-B-1, its
    branches the B rows after them (rollout_groups). A branch's row holds its parent's prefix, then its own tokens."""
    tokens: torch.Tensor  # (N, R) the whole response, right-padded
    logprobs: torch.Tensor  # (N, R) the sampler's log pi(o_t) under softmax(z / T), only logged (logprob_gap): the
    # ratio's pi_old is the trainer's recompute, or the live log-prob when one optimizer step uses a batch (aepo_update)
    entropy: torch.Tensor  # (N, R) token entropy H_t (Eq. 3)
    resp_mask: torch.Tensor  # (N, R) bool: the whole response (a branch: its parent's prefix too)
    loss_mask: torch.Tensor  # (N, R) bool: the tokens this row sampled itself (a branch skips the prefix)
    truncated: torch.Tensor  # (N,) bool: hit its budget without a stop token
    parent: torch.Tensor  # (N,) row of a branch's parent, -1 for a fresh sample
    branch_at: torch.Tensor  # (N,) where a branch starts sampling (0 for a fresh sample)
    tau: torch.Tensor  # (N,) HWE threshold (§3.2.1) each row is scored against: its round's first-pass tau, all ranks
    texts: list[str] = field(default_factory=list)  # the decoded responses (grade_rollouts)
    acc: torch.Tensor | None = None  # (N,) the grader's 0/1, or --reward-fn's score in [0, 1] (grade_rollouts)
    rounds: int = 1  # rollout rounds of the step (refill: cat_rollouts)


def choose_branch_points(hbar: torch.Tensor, hwe: torch.Tensor, budget: int, max_per_response: int, w: int):
    """Branch points of one prompt's first-pass responses: HWE positions, highest window entropy first, at most
    `max_per_response` per parent, at least `w` tokens apart within a parent, t >= 1 (a non-empty prefix),
    at most `budget` in all. hbar, hwe (n, R) -> [(row, t), ...]."""
    rows, ts = hwe.nonzero(as_tuple=True)
    order = torch.argsort(hbar[rows, ts], descending=True, stable=True)
    chosen: dict[int, list[int]] = {}
    points = []
    for k in order.tolist():
        if len(points) >= budget:  # checked first: a budget of 0 chooses nothing
            break
        r, t = int(rows[k]), int(ts[k])
        taken = chosen.setdefault(r, [])
        if t < 1 or len(taken) >= max_per_response or any(abs(t - s) < w for s in taken):
            continue
        taken.append(t)
        points.append((r, t))
    return points


def rollout_groups(model, prompts: list[dict], cfg: Config, ids: dict, generator, triggers=None, pool=None) -> Rollouts:
    """G responses per prompt (§3.2; README: branching rollouts): G - B fresh samples, tau over them (all ranks),
    then B continuations branched at the highest-entropy HWE windows (shortfall: fresh samples). The branch rows are
    batched together in sampler calls (sampler_calls) of at most --rollout-batch rows and, on the eager sampler, no
    more KV columns than that many rows of full length (prompt + response) would hold.
    -> Rollouts, every row at its final index (ungraded: texts and acc come from grade_rollouts)."""
    G, B, w, L = cfg.group_size, cfg.branch_samples, cfg.window, cfg.max_response_len
    fresh, P = G - B, len(prompts)
    kw = dict(ids=ids, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator, pool=pool,  # one prefill
              prefill_tokens=cfg.micro_batch_size * (cfg.max_prompt_len + L))  # forward: at most a micro-batch's tokens
    cap = cfg.rollout_batch if isinstance(cfg.rollout_batch, int) else P * G  # "auto": resolved by rollout_memory
    per_call = max(1, cap // fresh)  # prompts per sampler call: bounds the KV cache
    first = [r for k in range(0, P, per_call)
             for r in unpadded(sample(model, prompts[k:k + per_call], max_new_tokens=L, repeats=fresh, **kw))]
    H, mask = pad([r["entropy"] for r in first])  # (P * fresh, R1)
    tau = hwe_threshold(H, mask, cfg.entropy_quantile)
    hbar, valid = window_entropy(H, mask, w)
    m = hwe_mask(hbar, valid, tau, pad([r["tokens"] for r in first], ids["pad"])[0], triggers)
    rows, parent, branch_at = [None] * (P * G), [-1] * (P * G), [0] * (P * G)  # in the final order
    for p in range(P):
        own = slice(p * fresh, (p + 1) * fresh)
        rows[p * G:p * G + fresh] = first[own]
        points = choose_branch_points(hbar[own], m[own], B, cfg.max_branches_per_response, w) if B else []
        for k, (r, t) in enumerate(points + [(-1, 0)] * (B - len(points))):  # shortfall: fresh samples (t = 0)
            parent[p * G + fresh + k], branch_at[p * G + fresh + k] = (p * G + r if r >= 0 else -1), t
    jobs = [i for i in range(P * G) if i % G >= fresh]  # the branch rows, each continued from its parent's prefix
    heads = [len(prompts[i // G]["ids"]) + branch_at[i] for i in jobs]  # prompt + prefix tokens of each
    eager_room = None if pool is not None else cap * (cfg.max_prompt_len + L)  # the pool's rows use their own columns
    for part in sampler_calls(jobs, heads, [L - branch_at[i] for i in jobs], cap, eager_room):
        prefix = [rows[parent[i]]["tokens"][:branch_at[i]] if parent[i] >= 0 else torch.zeros(0, dtype=torch.long)
                  for i in part]
        out = sample(model, [prompts[i // G] for i in part], budgets=[L - branch_at[i] for i in part],
                     prefixes=[x.tolist() for x in prefix], **kw)
        for i, new, x in zip(part, unpadded(out), prefix):
            head = rows[parent[i]] if parent[i] >= 0 else None
            rows[i] = {k: torch.cat([head[k][:len(x)], v]) if head and k != "truncated" else v for k, v in new.items()}
    tokens, resp_mask = pad([r["tokens"] for r in rows], ids["pad"])  # (N, R)
    branch_at = torch.tensor(branch_at)  # (N,)
    return Rollouts(tokens=tokens, logprobs=pad([r["logprobs"] for r in rows])[0],
                    entropy=pad([r["entropy"] for r in rows])[0], resp_mask=resp_mask,
                    loss_mask=resp_mask & (torch.arange(tokens.shape[1])[None] >= branch_at[:, None]),
                    truncated=torch.tensor([r["truncated"] for r in rows]), parent=torch.tensor(parent),
                    branch_at=branch_at, tau=torch.full((P * G,), tau, dtype=torch.float64))


def sampler_calls(jobs: list, heads: list[int], budgets: list[int], cap: int, room: int | None = None) -> list[list]:
    """The branch rows `jobs` (heads: prompt + prefix tokens, budgets: new tokens, each) in sampler calls of at most
    `cap` rows, filled shortest heads first, each call's rows in their order in `jobs`. room (the eager sampler): also
    at most that many KV columns a call, counted as its cache holds them: rows x (longest head + largest budget), every
    row padded to both. A call mixing long prefixes (small budgets) with short ones (large budgets) would otherwise hold
    up to --max-prompt-len + 2 x --max-response-len columns a row, not the --max-prompt-len + --max-response-len that
    --rollout-batch is sized for. Example, cap 4, room 4 x 10: heads [2, 8, 3], budgets [8, 2, 7] -> [[0, 2], [1]]
    (all three: 3 x (8 + 8) > 40)."""
    calls, part, top, most = [], [], 0, 0
    for k in sorted(range(len(jobs)), key=lambda k: heads[k]):
        wide, deep = max(top, heads[k]), max(most, budgets[k])
        if part and (len(part) == cap or room is not None and (len(part) + 1) * (wide + deep) > room):
            calls.append(part)
            part, wide, deep = [], heads[k], budgets[k]
        part, top, most = part + [k], wide, deep
    return [[jobs[k] for k in sorted(c)] for c in calls + [part] if c]


def unpadded(out: dict) -> list[dict]:
    """sample() output -> one dict per row: its sampled tokens, logprobs, entropy (n,) and truncated."""
    n = out["mask"].sum(1).tolist()
    return [dict(tokens=out["tokens"][i, :n[i]], logprobs=out["logprobs"][i, :n[i]], entropy=out["entropy"][i, :n[i]],
                 truncated=bool(out["truncated"][i])) for i in range(len(n))]



# ----------------------------------------------------------------------------------------------------------
# Stage 1: adaptive cold start (paper §3.1). Cross-entropy on response tokens only, one token-mean over
# the global batch: each micro-batch divides its summed loss by the GLOBAL response-token count of the step, so any
# micro-batch size, accumulation or number of ranks gives the same gradient. It runs before AEPO but uses none of the
# functions above (its data were curated by data_prep.py adacs), so its loop sits here, beside AEPO's.


def train_coldstart(cfg: Config) -> Path:
    cfg, run, records, world, device = start_stage(cfg, "coldstart")
    responses = [torch.tensor(r["response_ids"]) for r in records]  # trace + end of turn (filter_traces)
    prepare_training(cfg, run, device, last_step(cfg, len(records)))
    if finished(run, run.total):
        return run.ckpt
    rank0_print(f"coldstart: {cfg.model} | params {run.n_params / 1e6:.2f}M, trainable {run.n_trainable / 1e6:.2f}M | "
                f"{len(records)} records | world {world} | batch {cfg.batch_size} = {world} ranks x "
                f"{math.ceil(cfg.batch_size / world / cfg.micro_batch_size)} micro-batches of <= {cfg.micro_batch_size} "
                f"| {run.total} steps | device {device}")
    metrics = Metrics(run.out, run.total, run.state["step"], "coldstart", rank() == 0,
                      open_tracker(cfg, run.out, run.record, run.state["step"]))
    for step in range(run.state["step"], run.total):
        t0 = time.time()
        mine = step_indices(len(records), step, cfg.batch_size, cfg.seed)
        n_tok = all_reduce(torch.tensor(float(sum(len(responses[i]) for i in mine)))).item()
        micro = [mine[k:k + cfg.micro_batch_size] for k in range(0, len(mine), cfg.micro_batch_size)]
        sums = torch.zeros(2, dtype=torch.float64)  # the loss, and every token the model read (prompts too: MFU)
        for k, part in enumerate(micro):
            batch = make_batch(run.hf, encode_prompts(run.processor, [records[i] for i in part]),
                               [responses[i] for i in part], run.ids["pad"], device)
            with sync_context(run.model, k == len(micro) - 1), autocast(cfg, device):
                logp, _ = run.model(batch)
                loss = -(logp * batch["resp_mask"]).sum() / n_tok  # this micro-batch's share of the global mean
                (loss * world).backward()  # DDP/FSDP average gradients over ranks; undo the 1/world
            sums += torch.stack([loss.detach().double().cpu(), batch["attention_mask"].sum().double().cpu()])
        lr = run.sched.get_last_lr()[0]  # the rate this step's update uses (the scheduler then moves to the next)
        norm, ok = optimizer_step(run.opt, run.sched, run.params, cfg.grad_clip, run.model)
        loss_val, read = all_reduce(sums).tolist()
        wait_for_device(device)  # AdamW's kernels are still queued on a GPU: they are this step's time
        dt = time.time() - t0
        row = dict(step=step + 1, loss=loss_val, lr=lr, grad_norm=norm, skipped=not ok,
                   tokens_per_s=n_tok / dt, mfu=mfu(read / dt, run.n_lm, run.n_lm_trained, device), time=dt,
                   **(graphs_compiled() if cfg.compile else {}))
        if not ok or not math.isfinite(loss_val):
            rank0_print(f"step {step + 1}: non-finite loss {loss_val} or grad norm {norm}: update skipped")
        metrics.log(row, ("loss", "grad_norm", "lr"))
        stop_if_diverged(run.state, step + 1, not ok or not math.isfinite(loss_val), lr)
        run.state["step"] = step + 1
        if (step + 1) % cfg.save_every == 0 and step + 1 < run.total:
            save_checkpoint(run.out, f"step_{step + 1:06d}", run.policy, run.opt, run.sched, run.processor,
                            run.state, cfg.keep_last)
    metrics.close()
    return save_checkpoint(run.out, "final", run.policy, run.opt, run.sched, run.processor, run.state, cfg.keep_last)



# ----------------------------------------------------------------------------------------------------------
# Stage 2: AEPO (Alg. 1). Each step: branching rollouts -> grade -> buckets -> HWE counts -> shaped
# rewards -> GRPO advantages -> filter -> clipped update with token-wise dynamic KL -> kappa controller.


def train_aepo(cfg: Config) -> Path:
    cfg, run, records, world, device = start_stage(cfg, "aepo")
    prepare_training(cfg, run, device, cfg.steps * cfg.minibatches * cfg.ppo_epochs)
    if finished(run, cfg.steps):
        return run.ckpt
    G, B, st = cfg.group_size, cfg.branch_samples, run.state
    # The starting weights. On --resume the flags name the same files (check_run_record), maybe spelled from another
    # working folder: take them as given now, a local folder made absolute, never the spelling saved in the state.
    start = cfg.ref_model or cfg.model
    st["ref_model"] = str(Path(start).expanduser().resolve()) if start != "tiny" and Path(start).expanduser().exists() \
        else start
    st.setdefault("targets", torch.full((3,), float("nan"), dtype=torch.float64))  # T_d per bucket, NaN = unseen
    st.setdefault("kappa", torch.ones(3, dtype=torch.float64))  # the KL controller, per bucket
    st.setdefault("tau_history", [])
    # LoRA: the policy with its adapters off is the starting model, unless --train-vision trains the tower under them
    adapters_off = cfg.lora_rank and not cfg.train_vision and not cfg.ref_model  # or --ref-model names another
    commit = run.commits.get("ref_model" if cfg.ref_model else "model")  # a hub model's: the one the run started from
    ref = (lora_reference(run.hf, run.model) if adapters_off else load_reference(st["ref_model"], cfg, device, commit)
           ) if cfg.kl_coef > 0 else None
    sampler = sampling_copy(cfg, run, device)
    pool = rollout_memory(cfg, run, device)  # resolves --rollout-batch auto; with --compile, the run's KV pool
    triggers = trigger_table(run.processor, run.hf.config.get_text_config().vocab_size) if cfg.trigger_words else None
    levels = sorted({str(r["difficulty"]) for r in records}) if all(r.get("difficulty") for r in records) else []
    rank0_print(f"aepo: {cfg.model} | params {run.n_params / 1e6:.2f}M | {len(records)} prompts | world {world} | "
                f"{cfg.batch_size} prompts x G={G} ({G - B} fresh + {B} branched) per step | {cfg.minibatches} "
                f"updates/step | {cfg.steps} steps | KL {'on' if ref else 'off'} | device {device}")
    metrics = Metrics(run.out, cfg.steps, st["step"], "aepo", rank() == 0, open_tracker(cfg, run.out, run.record, st["step"]))
    for step, recs, prompts, ro, time_sample in rollouts(cfg, run, sampler, records, device, triggers, pool):
        t1 = time.time()
        sc = score_groups(ro, cfg, st["targets"], triggers)
        st["targets"] = sc.targets
        t2 = time.time()
        lr = run.sched.get_last_lr()[0]  # the rate of this step's first optimizer step
        if sc.groups[0] > 0:
            upd = aepo_update(cfg, run, ref, device, prompts, ro, sc.adv, sc.bucket, sc.hwe, sc.keep,
                              torch.Generator().manual_seed(step_seed(cfg, step)))
            refresh_sampling_copy(sampler, run.hf)
            wait_for_device(device)  # the last AdamW step and the copy's refresh are queued: time_update's, not sampling's
            if ref is not None and cfg.kl_mode == "dynamic":
                st["kappa"] = update_kl_controller(st["kappa"], upd["kl_outside"], upd["kl_seen"], cfg.kl_target,
                                                   cfg.kl_adapt_rate)
        else:
            upd = dict(skipped_reason="every group was filtered (all right or all wrong)")
            rank0_print(f"step {step + 1}: {upd['skipped_reason']}: no update")
        st["tau_history"].append(step_tau(ro))
        st["step"] = step + 1
        row = aepo_log_row(step, ro, sc, st, upd, (time_sample, t2 - t1, time.time() - t2), lr)
        row.update(level_stats(levels, recs, sc, G) if levels else {})
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):  # and the final checkpoint
            with gathered(run.policy), autocast(cfg, device), evaluating(sampler):
                row.update(validate(cfg, sampler, run.processor, run.ids, run.held_out))
        row.update(graphs_compiled() if cfg.compile else {})  # torch.compile's new graphs this step (0 after warm-up)
        metrics.log(row, ("reward", "acc", "len", "tau"))
        stop_if_diverged(st, step + 1, upd.get("updates", 0) > 0 and upd["skipped"] == upd["updates"], lr)
        if cfg.log_samples_every and (step + 1) % cfg.log_samples_every == 0:
            rank0_print(f"\n[step {step + 1}] answer {recs[0]['answer']!r}, acc {sc.acc[0]:.0f}, reward "
                        f"{sc.rewards[0]:.3f}: {ro.texts[0][:400]!r}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(run.out, f"step_{step + 1:06d}", run.policy, run.opt, run.sched, run.processor, st, cfg.keep_last)
    metrics.close()
    rank0_print(f"curves of this run: python eval.py curves {shlex.quote(str(run.out / 'metrics.jsonl'))}")
    return save_checkpoint(run.out, "final", run.policy, run.opt, run.sched, run.processor, st, cfg.keep_last)


def rollouts(cfg: Config, run: Run, sampler, records: list[dict], device, triggers=None, pool=None):
    """Each step's rollouts from the resumed step on, graded: (step, its records, their encoded prompts,
    rollout_groups() output with texts and acc, seconds spent sampling and grading). A generator: step s + 1 is
    sampled only after step s's update. Refill (DAPO's dynamic sampling): while fewer than --batch-size groups of
    all ranks are mixed (some right, some wrong, whatever --group-filter says: both rules keep nearly all of those),
    --batch-size more prompts are rolled out, at most --max-refill-rounds times (the same decision on every rank: a
    global count); ro.rounds says how many. --keep-uniform-groups: no refill (every group trains)."""
    tok = tokenizer_of(run.processor)
    for step in range(run.state["step"], cfg.steps):
        t0 = time.time()
        gen = torch.Generator(device).manual_seed(step_seed(cfg, step))
        recs, prompts, parts = [], [], []
        for rnd in range(cfg.max_refill_rounds + 1):
            new = [records[i] for i in draw(len(records), step, rnd, cfg)]
            recs, prompts = recs + new, prompts + encode_prompts(run.processor, new)
            with gathered(run.policy), autocast(cfg, device), evaluating(sampler):
                ro = rollout_groups(sampler, prompts[-len(new):], cfg, run.ids, gen, triggers, pool)
            parts.append(grade_rollouts(ro, new, cfg, tok))
            mixed = informative_groups(torch.cat([x.acc for x in parts]), None, cfg.group_size)  # (P,) so far
            if cfg.keep_uniform_groups or all_reduce(torch.tensor([float(mixed.sum())])) >= cfg.batch_size:
                break
        yield step, recs, prompts, cat_rollouts(parts, run.ids["pad"]), time.time() - t0


def draw(n: int, step: int, rnd: int, cfg: Config) -> list[int]:
    """This rank's records in refill round `rnd` of a step: round 0 the step's share of the epoch (step_indices);
    a refill round --batch-size records at random (seeded by seed, step and round) among those no earlier round of
    the step drew, on any rank (a data set too small for that: then those drawn before), dealt round-robin. Each
    round's list is the same on every rank and for any number of ranks. Example, 6 records, --batch-size 2: rounds
    0, 1, 2 draw each record once."""
    if rnd == 0:
        return step_indices(n, step, cfg.batch_size, cfg.seed)
    drawn = set(step_batch(n, step, cfg.batch_size, cfg.seed))  # round 0's, all ranks'
    for r in range(1, rnd + 1):  # each refill round's list depends on the rounds before it
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + r))
        batch = sorted(order.tolist(), key=lambda i: i in drawn)[:cfg.batch_size]  # stable: undrawn ones first
        drawn.update(batch)
    return batch[rank()::world_size()]


def grade_rollouts(ro: Rollouts, recs: list[dict], cfg: Config, tok) -> Rollouts:
    """The rollouts of recs' prompts, graded: texts (the decoded responses) and acc (N,): the grader's 0/1, or
    --reward-fn's score in [0, 1] (data_prep.score_responses)."""
    lengths = ro.resp_mask.sum(1)  # (N,) tokens of the whole response (a branch: its parent's prefix too)
    ro.texts = [tok.decode(ro.tokens[i, :lengths[i]], skip_special_tokens=True) for i in range(len(lengths))]
    ro.acc = data_prep.score_responses(recs, ro.texts, cfg.group_size, cfg.reward_fn, cfg.grader_timeout,
                                       cfg.grader_workers)  # (N,)
    return ro


def cat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """The graded rollouts of a step's refill rounds as one: rows concatenated (token axes padded, parents
    re-indexed, each row keeping its round's tau), rounds their number."""
    start = np.cumsum([0] + [len(p.parent) for p in parts[:-1]]).tolist()  # first row of each round
    R = max(p.tokens.shape[1] for p in parts)
    padded = lambda key, value=0: torch.cat([F.pad(getattr(p, key), (0, R - p.tokens.shape[1]), value=value)  # noqa: E731
                                             for p in parts])  # (N, R)
    return Rollouts(tokens=padded("tokens", pad_id), logprobs=padded("logprobs"), entropy=padded("entropy"),
                    resp_mask=padded("resp_mask"), loss_mask=padded("loss_mask"),
                    truncated=torch.cat([p.truncated for p in parts]),
                    parent=torch.cat([torch.where(p.parent >= 0, p.parent + s, -1) for p, s in zip(parts, start)]),
                    branch_at=torch.cat([p.branch_at for p in parts]), tau=torch.cat([p.tau for p in parts]),
                    texts=[t for p in parts for t in p.texts], acc=torch.cat([p.acc for p in parts]), rounds=len(parts))


def step_tau(ro: Rollouts) -> float:
    """The step's tau in the log: the mean of its rounds' (each round has as many rows on every rank)."""
    return ro.tau.view(ro.rounds, -1)[:, 0].mean().item()


@dataclass
class Scores:
    """What score_groups makes of a step's graded Rollouts (N rows, P = N / G groups)."""
    acc: torch.Tensor  # (N,) the grader's 0/1 or --reward-fn's score
    format: torch.Tensor  # (N,) 1 where the response is <think>...</think> then \boxed{}
    lengths: torch.Tensor  # (N,) tokens of the whole response
    bucket: torch.Tensor  # (N,) the group's online difficulty: 0 easy, 1 medium, 2 hard (App. G)
    hwe: torch.Tensor  # (N, R) bool: the HWE mask m_{i,t}
    n_he: torch.Tensor  # (N,) N_HE: HWE tokens per response
    rewards: torch.Tensor  # (N,) R_i = acc_i + E_i (+ the format reward)
    adv: torch.Tensor  # (N,) GRPO advantages
    keep: torch.Tensor  # (N,) bool: the row's group survives the online filter and the --batch-size cut, and trains
    targets: torch.Tensor  # (3,) the bucket targets T_d after this step's EMA update
    groups: torch.Tensor  # (2,) groups kept and groups in all, over all ranks


def score_groups(ro: Rollouts, cfg: Config, targets: torch.Tensor, triggers=None) -> Scores:
    """App. G, I, M on one step's graded rollouts (N = P * G responses of P prompts; texts, acc from grade_rollouts):
    bucket each group, count each response's HWE tokens, shape its reward; then GRPO advantages and the online
    filter (Eq. 2), at most --batch-size groups (refill may draw more). targets (3,): T_d before this step.
    -> Scores."""
    G, acc = cfg.group_size, ro.acc  # acc (N,) in {0, 1}, or --reward-fn's in [0, 1]
    lengths = ro.resp_mask.sum(1)  # (N,) tokens of the whole response (a branch: its parent's prefix too)
    fmt = torch.tensor([float(format_ok(t)) for t in ro.texts])  # (N,) in {0, 1}
    bucket = difficulty_buckets(acc, G)  # (N,) 0 easy, 1 medium, 2 hard: from the group's accuracy
    hbar, valid = window_entropy(ro.entropy, ro.resp_mask, cfg.window)  # (N, R) each
    hwe = hwe_mask(hbar, valid, ro.tau[:, None], ro.tokens, triggers)  # (N, R) bool; each row against its round's tau
    n_he = hwe.sum(1).double()  # (N,) N_HE over the whole response
    for_reward, targets = update_targets(targets, n_he, bucket, cfg.target_momentum)  # (3,) each; all groups count
    rewards = entropy_shaped_reward(acc, n_he, bucket, for_reward, cfg.entropy_shaping, cfg.entropy_coef)  # (N,)
    rewards = rewards + cfg.format_weight * fmt  # (N,)
    adv = grpo_advantages(rewards, G, std=cfg.adv_norm == "std").float()  # (N,) normalised within each group of G
    keep_group = keep_first(informative_groups(acc, rewards, G, cfg.group_filter) | cfg.keep_uniform_groups,
                            cfg.batch_size, ro.rounds)  # (P,)
    groups = all_reduce(torch.tensor([float(keep_group.sum()), float(len(keep_group))]))  # (2,) kept, all
    return Scores(acc=acc, format=fmt, lengths=lengths, bucket=bucket, hwe=hwe, n_he=n_he, rewards=rewards, adv=adv,
                  keep=keep_group.repeat_interleave(G), targets=targets, groups=groups)


def informative_groups(acc: torch.Tensor, rewards: torch.Tensor | None, G: int, rule: str = "accuracy") -> torch.Tensor:
    """The online filter (Eq. 2), (N,) -> (P,) bool, a group kept. accuracy (README: choices): some answers right and
    some wrong. reward (the paper's): the group's mean shaped reward in [0.01, 0.99], so an all-right group is kept
    when its entropy penalties average over 0.01 and an all-wrong one when its exploration bonus does. Example, G = 2:
    acc [1, 1, 0, 0], rewards [1.0, 0.96, 0.0, 0.0] -> accuracy [False, False], reward [True, False]."""
    if rule == "reward":
        mean = group_mean(rewards, G)  # (P,)
        return (mean >= 0.01) & (mean <= 0.99)
    p = group_mean(acc, G)  # (P,)
    return (p > 0) & (p < 1)


def keep_first(keep_group: torch.Tensor, n: int, rounds: int = 1) -> torch.Tensor:
    """keep_group (P,) of this rank, `rounds` rounds of P / rounds groups -> only the first n kept groups in the order
    one rank would have drawn them (drawn_position): the same cut on every rank, whatever their number, and no rank's
    refill groups before another's round 0. Example, n = 4, 2 ranks, 2 rounds: keep_group [T, F, T, T] on rank 0 and
    [T, T, T, T] on rank 1 are, drawn in order, round 0 [T, T, F, T] and round 1 [T, T, T, T], whose first 4 kept
    groups are 0, 1, 3 and 4: rank 0 keeps [T, F, T, F] and rank 1 [T, T, F, F]."""
    P, world = len(keep_group), world_size()
    at = drawn_position(P, rounds, rank(), world)  # (P,)
    kept = torch.zeros(P * world, dtype=torch.float64)  # (P * world,) every rank's groups, in drawn order
    kept[at] = keep_group.double()
    first = all_reduce(kept).cumsum(0) <= n  # (P * world,) at most n kept groups up to and including this one
    return keep_group & first[at]


def drawn_position(P: int, rounds: int, rank: int, world: int) -> torch.Tensor:
    """Where a rank's P groups (`rounds` rounds of P / rounds, round by round) stand in the step's groups of all ranks,
    ordered as one rank draws them: round by round, each round in the order of its list, which step_indices and draw
    deal round-robin, so the rank's i-th group of a round is the round's (i * world + rank)-th. -> (P,). Example,
    P = 4, rounds = 2, rank 1 of 2: [1, 3, 5, 7]."""
    per_round = P // rounds  # groups of a round on each rank: --batch-size / world
    i = torch.arange(P)  # (P,)
    return (i // per_round) * per_round * world + (i % per_round) * world + rank  # (P,)


def aepo_update(cfg, run, ref, device, prompts, ro, adv, bucket, hwe, keep, generator) -> dict:
    """The clipped policy update on the kept rows: `minibatches` optimizer steps per epoch, each over an equal
    share of this rank's rows, in micro-batches. Ranks may keep different numbers of rows, so each minibatch
    runs the global maximum number of micro-batches; a rank short of rows runs row 0 with weight 0 (every rank
    must run the same forward/backward calls). Returns statistics (update_stats) and the kappa controller's input:
    kl_outside (3,), each bucket's mean KL outside HWE windows (all ranks), and kl_seen (3,), the buckets measured."""
    G, world, M, mb = cfg.group_size, world_size(), cfg.minibatches, cfg.micro_batch_size
    rows = keep.nonzero().squeeze(1)
    rows = rows[torch.randperm(len(rows), generator=generator)].tolist()
    loss_mask = ro.loss_mask.float()  # (N, R) the tokens each row sampled itself
    kl_w = (kl_weights(hwe, bucket, run.state["kappa"], cfg.kl_coef, cfg.kl_relax) if cfg.kl_mode == "dynamic"
            else torch.full(hwe.shape, cfg.kl_coef))  # (N, R) beta_{i,t}; fixed: plain GRPO's one beta
    trains = sorted(rows)  # old and reference log-probs only for the rows that train (filtered, surplus: none)
    old = logprobs_for(run.model, run, cfg, device, prompts, ro, trains, G) if M * cfg.ppo_epochs > 1 else None
    ref_lp = logprobs_for(ref, run, cfg, device, prompts, ro, trains, G) if ref is not None else None  # (N, R)
    kl_sums = torch.zeros(4, 3, dtype=torch.float64)  # kl_by_bucket's, over the first epoch
    stats = dict(clip_frac=0.0, tokens=0.0, kl=0.0, grad_norm=[], skipped=0, updates=0)
    chunks = [sorted(rows[k::M]) for k in range(M)]  # sorted: a group's rows share a micro-batch and its images
    for epoch in range(cfg.ppo_epochs):
        for mb_rows in chunks:
            count = len(mb_rows) if cfg.loss_agg == "seq-mean-token-mean" else loss_mask[mb_rows].sum().item()
            denom = all_reduce(torch.tensor([float(count)])).item()  # responses (tokens) per optimizer step, all ranks
            n_micro = int(all_reduce(torch.tensor([math.ceil(len(mb_rows) / mb)]),
                                     dist.ReduceOp.MAX if dist.is_initialized() else None).item())
            if denom == 0:
                continue
            for k in range(n_micro):
                part = mb_rows[k * mb:(k + 1) * mb]
                weight, part = (1.0 if part else 0.0), part or [0]
                batch = teacher_forced(run, device, prompts, ro, part, G)
                with sync_context(run.model, k == n_micro - 1), autocast(cfg, device):
                    logp, _ = run.model(batch, cfg.temperature)  # (n, R') with R' <= R
                    R = logp.shape[1]
                    lp_old = old[part, :R].to(device) if old is not None else logp.detach()
                    lp_ref = ref_lp[part, :R].to(device) if ref_lp is not None else None
                    loss, st = aepo_loss(logp, lp_old, lp_ref, adv[part].to(device), kl_w[part, :R].to(device),
                                         loss_mask[part, :R].to(device), cfg.loss_agg, denom, cfg.clip_low,
                                         cfg.clip_high, cfg.dual_clip)
                    (loss * weight * world).backward()  # DDP/FSDP average gradients over ranks; undo the 1/world
                if weight and epoch == 0:
                    for key in ("clip_frac", "tokens", "kl"):
                        stats[key] += st[key]
                    if lp_ref is not None:  # the controller's input: KL on the policy being updated, kept rows only
                        kl_sums += kl_by_bucket(k3_kl(logp.detach(), lp_ref), loss_mask[part, :R], hwe[part, :R],
                                                bucket[part])
            norm, ok = optimizer_step(run.opt, run.sched, run.params, cfg.grad_clip, run.model)
            stats["grad_norm"].append(norm)
            stats["skipped"] += not ok
            stats["updates"] += 1
    kl_sums = all_reduce(kl_sums)  # (4, 3) all ranks
    # Alg. 1's controller input, per bucket: the mean over its responses of each one's mean KL outside HWE windows
    kl_outside, kl_seen = kl_sums[0] / kl_sums[1].clamp(min=1), kl_sums[1] > 0  # (3,) each
    return dict(update_stats(stats, kl_sums, old, ro, keep), kl_outside=kl_outside, kl_seen=kl_seen)


def kl_by_bucket(kl: torch.Tensor, loss_mask: torch.Tensor, hwe: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
    """A micro-batch's KL per bucket (this rank), over each row's loss tokens. kl, loss_mask, hwe (n, R); bucket (n,)
    -> (4, 3) float64: one column per bucket, one row per statistic:
      0: the sum over responses of each one's mean KL OUTSIDE HWE windows (the controller's signal, Alg. 1)
      1: the responses with a token outside windows (one wholly inside has no such mean and is not counted)
      2: the KL summed over tokens inside windows
      3: the tokens inside windows"""
    kl, lm, inside = kl.double().cpu(), loss_mask.double().cpu(), hwe.double().cpu()
    outside = lm * (1 - inside)  # (n, R)
    out_mean = (kl * outside).sum(1) / outside.sum(1).clamp(min=1)  # (n,) mean over the response's outside tokens
    counted = (outside.sum(1) > 0).double()  # (n,)
    return bucket_sums([out_mean, counted, (kl * lm * inside).sum(1), (lm * inside).sum(1)], bucket)


# ==========================================================================================================
# PART 2: THE TRAINER'S INFRASTRUCTURE. A reader learning ARES can stop here.
# What any trainer needs and ARES does not change: the process group, model loading (the tiny model, FSDP, LoRA,
# the KL reference), the policy's forward and its batches, wrapping (DDP or FSDP2), the optimizer and data order,
# checkpoints, metrics.jsonl and trackers, the run record, flag validation, the demo's script and the entry point.
# ==========================================================================================================



# ----------------------------------------------------------------------------------------------------------
# Distributed: rank and world size from torchrun's environment; world size 1 is the same code path.
# One process group serves both devices: the global statistics (tau, bucket means, token counts, loss
# denominators) are small CPU tensors reduced by gloo, the gradients CUDA tensors reduced by NCCL. (A plain
# "nccl" group serves CUDA tensors only: its first CPU all_reduce fails.)
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def init_distributed(timeout_s: float = 1800):
    """(rank, world, device). Launched by torchrun (RANK and MASTER_ADDR set), the process group is started even at
    world size 1, so that one GPU runs the collectives eight do; a collective that waits more than timeout_s for
    the other ranks (one died or hangs) raises instead of blocking forever."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    GROUP["formed"] = True  # from here a line that stops a rank may be its own (one_line_per_node)
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if (launched or world > 1) and not dist.is_initialized():
        import importlib
        from datetime import timedelta

        # before the group exists: its functions take `group=group.WORLD` as a default argument, bound at import; imported
        # later (loading a model does, through torch.distributed.fsdp) they hold the group, and destroy_process_group
        # leaves its gloo threads and sockets running into the exit of the process, where a rare abort was seen (README)
        importlib.import_module("torch.distributed.nn")
        dist.init_process_group(BACKENDS[device.type], timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


GROUP = {"formed": False}  # whether this command reached init_distributed


@contextlib.contextmanager
def one_line_per_node():
    """Until the process group forms, a line that stops the run is every rank's alike: local rank 0 says it and the
    others wait to be stopped (data_prep.let_local_rank_0_say_it). After that a line may be one rank's own, and each
    rank says its own at once."""
    GROUP["formed"] = False
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str) and not GROUP["formed"]:
            data_prep.let_local_rank_0_say_it()
        raise


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or op) over ranks, in place; a no-op without a process group. CPU tensors of float/long (gloo)."""
    if dist.is_initialized():  # a rank that stalls past --dist-timeout or dies: run_command's collective_failure
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def from_rank0(obj):
    """Rank 0's `obj` (pickled) on every rank; itself without a process group."""
    if dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank0_print(*args):
    if rank() == 0:
        print(*args, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (the list itself on one process)."""
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]



# ----------------------------------------------------------------------------------------------------------
# Models: a hub name or folder -> (model, processor); the tiny model; FSDP, LoRA and the reference.
# Qwen2/2.5/3-VL via the image-text-to-text auto class, text LMs via the causal-LM class; the processor is
# Qwen2-VL's, image-only (no torchvision). The tiny model is the offline demo's base model (data_prep.py has its
# tokenizer). `mm_token_type_ids` is always passed so that Qwen's 3-D rotary positions are used.


# Models and processors: a hub name or folder -> (model, processor). Qwen2/2.5/3-VL via the image-text-to-text
# auto class, text LMs via the causal-LM class; the processor is Qwen2-VL's, image-only (no torchvision). The
# tiny model is the offline demo's base model, built here with its tokenizer.
TINY_SIZES = dict(hidden=96, layers=3, heads=4, kv_heads=2, ffn=192, vision_hidden=48, vision_depth=2)


def is_tiny(name: str) -> bool:
    if name == "tiny":
        return True
    cfg_file = Path(name) / "config.json"
    return cfg_file.is_file() and json.loads(cfg_file.read_text()).get("ares_tiny", False)


def processor_class():
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextProcessor(Qwen2_5_VLProcessor):
        """Qwen2-VL-style processor for images and text only: the stock one needs a video processor (torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageTextProcessor


def tiny_processor():
    """The tiny model's processor: the tiny tokenizer, images of 56x56 to 112x112 pixels, and no answer-format
    instruction (its 60 tokens would make up most of the prompt, and the tiny model learns to read the image several
    times faster when the image tokens are a larger part of what it attends to)."""
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = processor_class()(image_processor, data_prep.tiny_tokenizer(), chat_template=data_prep.TINY_CHAT_TEMPLATE)
    processor.prompt_suffix = ""
    return processor


def build_tiny(seed: int = 0):
    """A tiny random Qwen2.5-VL (~0.5M parameters) with the tiny tokenizer: fully offline. -> (model, processor)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = tiny_processor()
    tok = tokenizer_of(processor)
    ids = tok.convert_tokens_to_ids
    s = TINY_SIZES
    head_dim = s["hidden"] // s["heads"]
    mrope = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]  # t, h, w
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["ffn"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": mrope},
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
                           num_heads=2, out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[s["vision_depth"] - 1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    config.ares_tiny = True  # saved in config.json: later stages pick the CPU-sized defaults
    config.ares_prompt_suffix = processor.prompt_suffix  # none (tiny_processor says why)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.bos_token_id = None
    return model, processor


def resize_images(image_processor, cfg, tiny: bool):
    """--min-pixels / --max-pixels onto a model's image processor. A tiny model (`tiny`, or a checkpoint of one)
    keeps the image size it learned on (56 x 56 to 112 x 112 pixels) unless a flag names another."""
    if not tiny or {"min_pixels", "max_pixels"} & set(cfg.given):
        image_processor.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}


def load_processor(name: str, is_vlm: bool, cfg, revision: str | None = None):
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(name, revision=revision)
    if not tok("a b", add_special_tokens=False)["input_ids"]:  # transformers builds an empty one where files are missing
        raise SystemExit(f"{name}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt): the tokenizer "
                         f"made without them ({len(tok)} tokens) reads all text as nothing; save the model's tokenizer "
                         "in the folder (processor.save_pretrained)")
    if not is_vlm:
        return tok
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(name, revision=revision)
    except OSError:
        raise SystemExit(f"{name}: no image processor settings (processor_config.json or preprocessor_config.json): "
                         "save the model's processor in the folder (processor.save_pretrained)") from None
    resize_images(image_processor, cfg, is_tiny(name))
    template = tok.chat_template
    for fname in ("chat_template.jinja", "chat_template.json"):  # VLM repos keep it beside the processor
        path = Path(name) / fname
        if template is None and path.is_file():
            template = path.read_text() if fname.endswith("jinja") else json.loads(path.read_text())["chat_template"]
    return processor_class()(image_processor, tok, chat_template=template)


VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # the vision-language model types this file runs


UNSUPPORTED = ("is not supported: ARES runs Qwen2-VL, Qwen2.5-VL, Qwen3-VL and text-only causal LMs whose decoder "
               "is `.model` (Qwen2, Qwen3, Llama, ...)")


def compute_dtype(cfg, device):
    """--dtype as a torch dtype: auto is bf16 on a GPU and fp32 on the CPU; 'file' (loading only): the checkpoint's."""
    if cfg.dtype in ("auto", "file"):
        return "auto" if cfg.dtype == "file" else torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]


def model_config(name: str, revision: str | None = None):
    """A model's config.json (a hub model's at the commit `revision`: model_commits), and whether it is a
    vision-language model; a model of another family stops here, before its tokenizer or weights are read: a VLM not
    in VLM_FAMILIES, or a causal LM whose decoder is not `.model`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name, revision=revision)
    is_vlm = hasattr(config, "vision_config")
    if config.model_type not in VLM_FAMILIES if is_vlm else not decoder_is_model(name, revision):  # other VLMs: other
        raise SystemExit(f"{name}: model type '{config.model_type}' {UNSUPPORTED}")  # processors, positions, features
    return config, is_vlm


@functools.lru_cache
def decoder_is_model(name: str, revision: str | None = None) -> bool:
    """Does a text-only model's causal LM hold its decoder as `.model` (Qwen2, Llama), not `.transformer` (GPT-2)?"""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):  # the module tree alone: no weights, no memory
            config = AutoConfig.from_pretrained(name, revision=revision)
            return hasattr(AutoModelForCausalLM.from_config(config), "model")
    except ValueError:  # not a causal LM at all (an encoder, ...)
        return False


def processor_for(name: str, cfg, revision: str | None = None):
    """The processor load_model gives with a model (a hub model's at the commit `revision`), without its weights (the
    training data's prompts are measured with it before they load), prompting with the instruction the model was
    trained with (`ares_prompt_suffix` in its config.json), else the authors' (README: paper settings)."""
    if name == "tiny":
        processor = tiny_processor()
        resize_images(processor.image_processor, cfg, tiny=True)
        return processor
    processor = load_processor(name, model_config(name, revision)[1], cfg, revision)
    if getattr(processor, "chat_template", None) is None:  # a base model's tokenizer: prompts could not be built
        raise SystemExit(f"--model {name}: its tokenizer has no chat template, and ARES builds every prompt with it: use "
                         "a chat or Instruct model, or add a template (chat_template.jinja beside the tokenizer)")
    processor.prompt_suffix = model_prompt_suffix(name, revision)
    return processor


def load_model(name: str, cfg, device, meta: bool = False, processor=None, revision: str | None = None):
    """Returns (model, processor): `processor`, else processor_for(name). bf16 on GPU and fp32 on CPU unless --dtype
    says otherwise (dtype 'file': the checkpoint's own). meta=True: an empty skeleton that takes no memory, for FSDP
    to shard and fill (fill_shards). A hub model is read at the commit `revision` (model_commits: the one a run
    started from, whatever the hub's main holds by its resume); a local folder has none."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    dtype = compute_dtype(cfg, device)
    if name == "tiny":
        with torch.device("meta") if meta else contextlib.nullcontext():
            model, tiny = build_tiny(cfg.seed)  # fp32
        if processor is None:
            processor = tiny
            resize_images(processor.image_processor, cfg, tiny=True)
        if dtype not in ("auto", torch.float32):  # its weights only: the rotary buffers stay fp32, as for a checkpoint
            cast_weights(model, dtype, torch.device("meta") if meta else torch.device("cpu"))
    else:
        config, is_vlm = model_config(name, revision)
        cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
        if meta:
            with torch.device("meta"):
                model = cls.from_config(config, dtype=dtype, attn_implementation=cfg.attn)
            with contextlib.suppress(OSError):  # the stop tokens live there
                model.generation_config = GenerationConfig.from_pretrained(name, revision=revision)
        else:  # in the file's own dtype: mapped from disk, one copy a host whatever its ranks; cast below
            from safetensors import SafetensorError

            try:
                model = cls.from_pretrained(name, revision=revision, dtype="auto", attn_implementation=cfg.attn)
            except (SafetensorError, OSError) as e:  # a cut copy or a damaged disk: one line, not 30 of traceback
                raise SystemExit(f"{name}: its weights could not be read ({str(e).splitlines()[0][:200]}): the folder "
                                 "is damaged or incomplete; copy it again, or give another checkpoint") from None
        if not hasattr(model, "model"):
            raise SystemExit(f"{name}: model type '{config.model_type}' {UNSUPPORTED}")
        processor = processor or processor_for(name, cfg, revision)
    model.config.use_cache = False
    if meta:
        return model, processor
    if name != "tiny" and dtype != "auto":
        cast_weights(model, dtype, device)
    return model.to(device), processor


def cast_weights(model, dtype, device):
    """Each weight onto `device` in `dtype`, one at a time, so that neither the host nor the device ever holds the
    model twice (DDP ranks load this way: before, each built the fp32 model in host memory first), and the config
    saying so (from_pretrained of a saved checkpoint reads it). Buffers (rotary frequencies) keep their fp32."""
    for p in model.parameters():
        p.data = p.data.to(device, dtype)
    for config in (model.config, *(getattr(model.config, k, None) for k in model.config.sub_configs)):
        if config is not None:
            config.dtype = dtype


def model_prompt_suffix(name: str, revision: str | None = None) -> str:
    """The instruction a model was trained with (`ares_prompt_suffix` in its config.json), else the authors' (README: paper settings);
    the tiny model: none."""
    from transformers import AutoConfig

    with contextlib.suppress(OSError, ValueError):  # a hub name offline and not cached: it fails to load later anyway
        return "" if name == "tiny" else getattr(AutoConfig.from_pretrained(name, revision=revision),
                                                 "ares_prompt_suffix", data_prep.FORMAT_PROMPT)
    return data_prep.FORMAT_PROMPT


def special_ids_of(tok) -> dict:
    """pad and end-of-turn token ids of a tokenizer."""
    eot = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    return dict(pad=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, eot=eot)


def special_ids(model, processor) -> dict:
    """pad, end-of-turn, stop set and image token ids of a model/processor pair."""
    tok = tokenizer_of(processor)
    ids = special_ids_of(tok)
    gen_eos = model.generation_config.eos_token_id
    stops = {ids["eot"], tok.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return dict(ids, stop=sorted(i for i in stops if i is not None), image=getattr(model.config, "image_token_id", None))


def vision_params(model):
    return [p for n, p in model.named_parameters() if ".visual." in f".{n}" or n.startswith("visual")]


def make_trainable(hf, cfg, revision: str | None = None):
    """The policy as the trainer trains it: in training mode (from_pretrained returns eval mode, and Hugging Face
    checkpoints a layer only in training mode), with --grad-checkpointing, LoRA adapters (--lora-rank; naming a hub
    --model's commit `revision`: add_lora), and the vision tower frozen unless --train-vision. Passes without
    gradients (sampling, old and reference log-probs) switch to eval mode themselves (evaluating). Under checkpointing
    the decoder layers keep the update's KV cache (shared_prompt_cache): a recompute sees what the forward saw."""
    hf.train()
    if cfg.grad_checkpointing:
        hf.activation_checkpointing_enable({"use_reentrant": False})
        for layer in (m for m in hf.modules() if type(m).__name__.endswith("DecoderLayer")):
            layer._can_checkpoint_with_cache = True
    hf = add_lora(hf, cfg, revision) if cfg.lora_rank else hf
    for p in vision_params(hf):
        p.requires_grad_(cfg.train_vision)
    return hf


@contextlib.contextmanager
def evaluating(model):
    """Eval mode for a pass without gradients (sampling, old and reference log-probs): no dropout, no checkpointing;
    the mode it had after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def load_for_fsdp(name: str, cfg: Config, device, processor=None, fill: bool = True, revision: str | None = None):
    """Loading for FSDP2 without a full copy per rank: every rank builds an empty (meta) skeleton to shard, and rank 0
    alone reads the weights, on the CPU, in the file's dtype (bf16 for the released models); fill_shards() sends them
    one tensor at a time. fill=False (a resume, whose shards come from the checkpoint's state/): no rank reads them.
    -> (skeleton, processor, rank 0's full model or None)."""
    skeleton, processor = load_model(name, cfg, device, meta=True, processor=processor, revision=revision)
    full = load_model(name, dataclasses.replace(cfg, dtype="file"), torch.device("cpu"), processor=processor,
                      revision=revision)[0] if fill and rank() == 0 else None
    return skeleton, processor, full


def add_lora(hf, cfg, revision: str | None = None):
    """peft's LoRA adapters (no dropout) on the language model's --lora-targets, injected in place (the model keeps its
    class); only they train (and the vision tower with --train-vision). B = 0 at the start, so the policy starts as
    the base model. Their config names it (a hub model with the commit `revision` the run reads: peft's AutoPeftModel
    loads the base at it, not at main)."""
    from peft import LoraConfig, inject_adapter_in_model

    start = Path(cfg.model).expanduser()  # saved in adapter_config.json: a local folder absolute, so that the adapter
    start = str(start.resolve()) if cfg.model != "tiny" and start.is_dir() else cfg.model  # finds it from anywhere
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=lora_target_list(cfg.lora_targets), exclude_modules=r".*visual.*",
                      base_model_name_or_path=start, revision=revision)  # the vision tower: none
    hf = inject_adapter_in_model(lora, hf)
    for n, p in hf.named_parameters():
        p.requires_grad_(".lora_" in n)
    hf.ares_lora = lora  # read by hf_export and save_adapter when a checkpoint is saved
    if cfg.train_vision and vision_params(hf):  # the tower trains whole, with no adapter: saved with the adapters as
        hf.ares_lora = dataclasses.replace(lora, modules_to_save=["visual"])  # peft saves a module it trains whole
    return hf


def lora_target_list(targets: str):
    """--lora-targets as peft takes it: 'all-linear', or a list of names (a layer matches its own name or a suffix)."""
    return targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]


@functools.lru_cache
def language_linear_layers(name: str) -> tuple[tuple[str, ...], str | None]:
    """The full names of the language model's linear layers (the vision tower's left out) and, when the output head
    shares the input embeddings, its name: from an empty (meta) model built from the config, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    with torch.device("meta"):
        if name == "tiny":
            model = build_tiny()[0]
        else:
            config = AutoConfig.from_pretrained(name)
            model = (AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM).from_config(config)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    names = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "visual" not in n)
    tied = head is not None and embed is not None and head.weight is embed.weight
    return names, next((n for n, m in model.named_modules() if m is head), None) if tied else None


def check_lora_targets(cfg):
    """--lora-targets that match no linear layer of the language model, in whole or in part (peft would raise, or drop
    a typo silently), or a tied output head (its merged weights could not be saved): one line before any weight loads."""
    if not cfg.lora_rank or cfg.lora_targets == "all-linear":
        return
    try:
        names, tied_head = language_linear_layers(cfg.model)
    except (OSError, ValueError):  # a hub name offline and not cached: loading the model says so later
        return
    targets = lora_target_list(cfg.lora_targets)
    match = {t: [n for n in names if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t in targets if not match[t]]
    if missing or not targets:
        raise SystemExit(f"--lora-targets {cfg.lora_targets}: no linear layer of the language model is called "
                         f"{', '.join(missing) or 'that'} (its linear layers: "
                         f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}; or all-linear)")
    if tied_head and any(tied_head in m for m in match.values()):
        raise SystemExit(f"--lora-targets {cfg.lora_targets}: {tied_head} shares its weights with the input "
                         "embeddings in this model, so a checkpoint could not hold its merged adapter: leave it out")


def lora_reference(hf, model):
    """The KL reference under LoRA (Eq. 1, Alg. 1: the starting policy): `model` (the policy around hf) with hf's adapters
    off, so no second copy is held. Called like the policy: (batch, temperature) -> (logp, entropy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in hf.modules() if isinstance(m, BaseTunerLayer)]

    def forward(*args):
        for m in layers:
            m.enable_adapters(False)
        try:
            return model(*args)
        finally:
            for m in layers:
                m.enable_adapters(True)

    return forward


def load_reference(name: str, cfg: Config, device, revision: str | None = None) -> nn.Module:
    """The frozen KL reference (Eq. 1, Alg. 1): the starting policy in the compute dtype, sharded like it with --fsdp;
    a hub model at the commit `revision` (model_commits: on --resume, the one the run started from)."""
    if sharded(cfg):
        hf, _, full = load_for_fsdp(name, cfg, device, revision=revision)
        ref = wrap_policy(hf.eval(), cfg, device, trainable=False)[0]
        fill_shards(ref, full)
        return ref
    return wrap_policy(load_model(name, cfg, device, revision=revision)[0].eval(), cfg, device, trainable=False)[0]


def sampling_copy(cfg: Config, run, device):
    """What the sampler runs on. Training keeps fp32 master weights; decoding them under autocast would cast
    every weight every step, so on a GPU without FSDP a bf16 copy is kept and refreshed after each update.
    (FSDP all-gathers bf16 weights for sampling; the CPU computes in fp32 anyway.) The copy is made one parameter at
    a time, each cast as it is copied, so a second fp32 copy never exists; buffers (rotary frequencies) keep their
    dtype, as in the trainer's forward."""
    dtype = compute_dtype(cfg, device)
    if sharded(cfg) or dtype == torch.float32:
        return run.hf
    import copy

    cast = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in run.hf.parameters()}
    return copy.deepcopy(run.hf, memo=cast).eval()  # deepcopy takes each parameter from the memo: tied ones stay tied


@torch.no_grad()
def refresh_sampling_copy(copy_model, hf):
    if copy_model is not hf:
        for a, b in zip(copy_model.parameters(), hf.parameters()):
            a.copy_(b)



# ----------------------------------------------------------------------------------------------------------
# The policy and its batches: encoded prompts and responses -> padded model inputs, log-probs.


class Policy(nn.Module):
    """The HF model plus a chunked log-prob head. DDP and FSDP act on a module's forward, so the log-probs of
    the response tokens are computed inside one forward without ever materialising (batch, length, vocab)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        self.banned = banned_tokens(hf)
        self.vision_every_rank = False  # wrap_policy: FSDP2 shards the vision tower's blocks (blank_image_features)

    def forward(self, batch: dict, temperature: float = 1.0, with_entropy: bool = False):
        """batch from `shared_prompt_batch` or `make_batch` (whole sequences). Returns log p(o_t | o_<t) and,
        without grad, the entropy: each (N, R)."""
        blank = self.vision_every_rank and batch.get("pixel_values") is None  # where the images would run
        anchor = blank_image_features(self.hf.model) if blank else None
        inputs = dict(model_inputs(batch), **encode_images(self.hf, batch))
        if "prompt_index" in batch:
            h = self.shared_prompt_hidden(batch, inputs)
        else:
            hidden = self.hf.model(**inputs, use_cache=False).last_hidden_state  # (N, L, H)
            idx = batch["resp_index"]  # (N, R): position of each response token; the one before predicts it
            h = hidden.gather(1, (idx - 1).clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))  # (N, R, H)
        banned = torch.tensor(self.banned, device=h.device) if self.banned else None
        logp, ent = head_logprobs(self.hf.get_output_embeddings(), h, batch["resp_tokens"], temperature, with_entropy,
                                  banned=banned)
        return (logp if anchor is None else logp + anchor), ent

    def shared_prompt_hidden(self, batch: dict, inputs: dict) -> torch.Tensor:
        """Each distinct prompt runs once into a KV cache (as prefill does), each response row gets its prompt's
        keys and values (an index: gradients flow back into the prompt), then all responses run as one right-padded
        continuation. Under gradient checkpointing both passes are checkpointed layer by layer (shared_prompt_cache).
        -> the hidden state that predicts each response token, (N, R, H)."""
        prompt = shared_prompt_cache(self.hf.config.get_text_config())
        last = self.hf.model(**inputs, cache=prompt, use_cache=False).last_hidden_state[:, -1]  # (P, H) predicts o_1
        idx, resp = batch["prompt_index"], batch["resp_tokens"]  # (N,), (N, R)
        cache = shared_prompt_cache(self.hf.config.get_text_config(), prompt, idx)
        att = torch.cat([batch["attention_mask"][idx], batch["resp_mask"].long()], 1)  # (N, L + R)
        pos = next_positions(batch["next_pos"][idx], resp.shape[1], batch["position_ids"].dim() == 3)
        hidden = self.hf.model(input_ids=resp, attention_mask=att, position_ids=pos, cache=cache,
                               use_cache=False).last_hidden_state  # (N, R, H); position t predicts o_{t+1}
        return torch.cat([last[idx, None], hidden[:, :-1]], 1)  # (N, R, H)


def blank_image_features(base: nn.Module) -> torch.Tensor:
    """FSDP2 shards the vision tower block by block, and each forward gathers a block's weights with a collective that
    every rank joins. A rank whose batch has no image runs the tower on one blank image of its smallest grid (1 frame,
    one merged token), where the images would run, and adds this to its output: 0 x the sum of every feature, so that
    a trained tower's gradients (zero) are reduced on every rank too."""
    vc = base.visual.config
    merge, patch = vc.spatial_merge_size, vc.patch_size
    grid = torch.tensor([[1, merge, merge]], device=base.visual.device)
    pixels = torch.zeros(merge * merge, vc.in_channels * vc.temporal_patch_size * patch * patch,
                         device=base.visual.device, dtype=base.visual.dtype)
    with torch.set_grad_enabled(tower_trains(base)):
        out = base.get_image_features(pixels, grid)
        layers = getattr(out, "deepstack_features", None) or []
        return 0.0 * sum(t.float().sum() for t in [*out.pooler_output, *(t for layer in layers for t in layer)])


def shared_prompt_cache(config, prompt=None, index: torch.Tensor | None = None):
    """The KV caches of Policy.shared_prompt_hidden, DynamicCaches that never grow twice. prompt=None: the prompt
    pass's, which stores each layer's keys and values once (its recompute in backward stores nothing new). Else the
    response pass's: each layer holds the prompt's keys and values of every response row (`index` (N,): its prompt)
    and returns them followed by the responses' own, storing nothing. Each pass has its own cache, so a recompute
    under gradient checkpointing sees what its forward saw, and the decoder layers may keep it (make_trainable)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    if prompt is not None:
        for mine, theirs in zip(cache.layers, prompt.layers):  # (N, KV heads, L, D): differentiable gathers
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys, mine.values = theirs.keys[index], theirs.values[index]

    def update(key_states, value_states, layer_idx, *args, **kwargs):  # (n, KV heads, q, D) each
        layer = cache.layers[layer_idx]
        if prompt is not None:
            return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
            layer.keys, layer.values = key_states, value_states
        return key_states, value_states

    cache.update = update
    return cache


def head_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float,
                  with_entropy: bool = False, chunk: int = 1024, banned: torch.Tensor | None = None):
    """log softmax(head(h) / T)[target] in chunks of `chunk` positions; each chunk's logits are recomputed in
    backward (activation checkpointing), so peak memory is one (N, chunk, V) block. h (N, R, H), targets (N, R)."""

    def piece(hc, tc):
        logits = without_banned(head(hc).float(), banned) / temperature  # (N, c, V)
        lse = logits.logsumexp(-1)
        logp = logits.gather(-1, tc[..., None]).squeeze(-1) - lse
        ent = None
        if with_entropy:
            with torch.no_grad():
                ent = lse - (logits.softmax(-1) * logits.nan_to_num(neginf=0.0)).sum(-1)  # H = logZ - E_p[z], Eq. 3
        return logp, ent

    outs = []
    for s in range(0, h.shape[1], chunk):
        hc, tc = h[:, s:s + chunk], targets[:, s:s + chunk]
        if torch.is_grad_enabled():
            outs.append(torch.utils.checkpoint.checkpoint(piece, hc, tc, use_reentrant=False))
        else:
            outs.append(piece(hc, tc))
    logp = torch.cat([o[0] for o in outs], 1)
    return logp, (torch.cat([o[1] for o in outs], 1) if with_entropy else None)


def pad(rows: list[torch.Tensor], value=0, left: bool = False, length: int = 1):
    """Stack 1-D tensors into (N, L), L = the longest (at least `length`), filled with `value`
    on the right (left=True: on the left). -> (padded (N, L), mask (N, L) bool of the real entries)."""
    L = max(max(len(r) for r in rows), length)
    out = torch.full((len(rows), L), value, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        where = slice(L - len(r), L) if left else slice(0, len(r))
        out[i, where], mask[i, where] = r, True
    return out, mask


def gather_images(prompts: list[dict]) -> dict:
    """The images of a batch of rows, each distinct one once: rows that share a prompt dict (a group's G
    responses) share its images. -> pixel_values and image_grid_thw of the distinct images, image_index (the
    distinct image behind each row's images, in order) and row_grid_thw (one grid per row image)."""
    first, pix, grid, index = {}, [], [], []
    for p in prompts:
        if p["pixel_values"] is None:
            continue
        if id(p) not in first:
            first[id(p)] = sum(len(g) for g in grid)  # distinct images so far
            pix.append(p["pixel_values"])
            grid.append(p["image_grid_thw"])
        index += range(first[id(p)], first[id(p)] + len(p["image_grid_thw"]))
    if not pix:
        return dict(pixel_values=None, image_grid_thw=None, image_index=None, row_grid_thw=None)
    grid = torch.cat(grid)
    return dict(pixel_values=torch.cat(pix), image_grid_thw=grid, image_index=index, row_grid_thw=grid[index])


def position_ids(model, input_ids, attention_mask, image_grid_thw=None):
    """Rotary positions for a padded batch: Qwen-VL's 3-D (t, h, w) positions -> (3, N, L); others (N, L)."""
    base = getattr(model, "model", model)
    if hasattr(base, "get_rope_index"):
        mm = (input_ids == model.config.image_token_id).int()
        return base.get_rope_index(input_ids, mm, image_grid_thw, attention_mask=attention_mask)[0]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def make_batch(model, prompts: list[dict], responses: list[torch.Tensor], pad_id: int, device) -> dict:
    """Right-padded prompt+response batch for teacher forcing. resp_index (N, R) gives the sequence position of
    each response token (padding repeats the last one), resp_tokens (N, R) the tokens, resp_mask (N, R) which
    are real."""
    seqs = [torch.cat([p["ids"], r.to(p["ids"])]) for p, r in zip(prompts, responses)]
    input_ids, attention_mask = pad(seqs, pad_id)  # (N, L)
    attention_mask = attention_mask.long()
    resp_mask = pad([r.to(torch.long) for r in responses])[1]  # (N, R)
    R = resp_mask.shape[1]
    resp_index = torch.stack([(len(p["ids"]) + torch.arange(R)).clamp(max=len(s) - 1) for p, s in zip(prompts, seqs)])
    images = gather_images(prompts)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, resp_index=resp_index, resp_mask=resp_mask,
                 resp_tokens=input_ids.gather(1, resp_index), **images,
                 position_ids=position_ids(model, input_ids, attention_mask, images["row_grid_thw"]))
    if getattr(model.config, "image_token_id", None) is not None:
        batch["mm_token_type_ids"] = (input_ids == model.config.image_token_id).int()
    dtype = next(model.parameters()).dtype
    return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def teacher_forced(run, device, prompts, ro, rows, G):
    """Batch of rollout rows for a forward pass: prompt + whole response (a branch's prefix is context), each
    distinct prompt once (shared_prompt_batch)."""
    lengths = ro.resp_mask.sum(1)
    rows_prompts, responses = [prompts[i // G] for i in rows], [ro.tokens[i, :lengths[i]] for i in rows]
    return shared_prompt_batch(run.hf, rows_prompts, responses, run.ids, device)


def shared_prompt_batch(model, prompts: list[dict], responses: list[torch.Tensor], ids: dict, device) -> dict:
    """Batch for Policy's shared-prompt forward: prompt_batch of the distinct prompts (P, L), prompt_index (N,) the
    prompt of each row, resp_tokens and resp_mask (N, R) the right-padded responses."""
    first: dict[int, int] = {}
    index = [first.setdefault(id(p), len(first)) for p in prompts]  # rows sharing a prompt dict share its prompt
    distinct = list({id(p): p for p in prompts}.values())  # in order of first appearance, as `first` counts
    resp_tokens, resp_mask = pad([r.long() for r in responses], ids["pad"])  # (N, R)
    return dict(prompt_batch(model, distinct, [[]] * len(distinct), ids, device), prompt_index=torch.tensor(index,
                device=device), resp_tokens=resp_tokens.to(device), resp_mask=resp_mask.to(device))


@torch.no_grad()
def logprobs_for(model, run, cfg, device, prompts, ro, rows, G) -> torch.Tensor:
    """log pi(o_t) under `model` of the given rows, in micro-batches, in eval mode (the LoRA reference is the policy's
    own module): (N, R) on the CPU, zero in the other rows. Every rank runs the global maximum number of
    micro-batches (a forward of a DDP-wrapped or sharded model is a collective); a rank short of rows runs one row
    and drops its result."""
    out, mb = torch.zeros(ro.tokens.shape), cfg.micro_batch_size
    n_micro = int(all_reduce(torch.tensor([math.ceil(len(rows) / mb)]),
                             dist.ReduceOp.MAX if dist.is_initialized() else None).item())
    for k in range(n_micro):
        part = rows[k * mb:(k + 1) * mb]
        batch = teacher_forced(run, device, prompts, ro, part or [0], G)
        with autocast(cfg, device), evaluating(run.model):
            lp, _ = model(batch, cfg.temperature)
        out[part, :lp.shape[1]] = lp.float().cpu()[:len(part)]
    if hasattr(model, "reshard"):  # FSDP2 keeps its root unit (embeddings, head) gathered after a forward, for a
        model.reshard()  # backward; none follows here (the reference never runs one)
    return out



# ----------------------------------------------------------------------------------------------------------
# The sampler's KV caches (sample, decode): EagerKV, the default, and the KV pool of --compile: one per process,
# allocated once and reused by every sample() call, with a decode step compiled once (CUDA graphs on a GPU) for a fixed
# set of row counts and key lengths.


SDPA_GQA_DECODE = True  # the eager decode step forces SDPA's grouped-query mode (EagerKV.step)


class EagerKV:
    """The eager sampler's KV cache: prefill()'s, copied `repeats` times, grown by one column per step; once a
    quarter of the batch is done, its finished rows leave it."""

    def __init__(self, state: dict, repeats: int, compact: float = 0.75):
        self.cache, self.att, self.compact = state["cache"], state["att"].repeat_interleave(repeats, 0), compact
        self.cache.batch_repeat_interleave(repeats)
        self.rows = torch.arange(len(self.att), device=self.att.device)  # the output row of each batch row
        self.padded = not self.att.all().item()  # read here and at checks only, never in a step

    def keep(self, live: torch.Tensor, t: int) -> torch.Tensor | None:
        """At a check (live (B,)): the batch rows that stay, or None to keep them all."""
        if live.sum() > self.compact * len(live):
            return None
        keep = live.nonzero().squeeze(1)
        self.cache.batch_select_indices(keep)
        self.att = self.att[keep]
        self.padded = not self.att.all().item()
        return keep

    def step(self, model, tok, pos, u, t: int, temperature: float, top_p: float, banned):
        """Feed each row's last token through the KV cache, then sample the next one."""
        self.att = torch.cat([self.att, self.att.new_ones(len(self.att), 1)], 1)
        # SDPA: the mask as Hugging Face would build it for one query token, none without padding, else each row's
        # keys (B, 1, 1, L) bool. Given the 2-D mask, its SDPA path reads it on the host every step (a device wait).
        # Other attentions take the 2-D mask (eager adds a 4-D mask to the scores; flash wants (B, L)).
        sdpa = text_decoder(model).config._attn_implementation == "sdpa"
        mask = (self.att.bool()[:, None, None, :] if self.padded else None) if sdpa else self.att
        # Decode steps only (one query token): SDPA's own grouped-query mode reads the KV cache once where Hugging
        # Face's path copies every KV head heads/kv_heads times (H200, Qwen2.5-VL-3B, 256 rows: 51 -> 22 ms per step).
        # Open (README, benchmarks): transformers 5.24 packs a one-token query's heads itself; SDPA_GQA_DECODE = False
        # leaves it that path (bench.py's method eager_packed times both).
        with mock.patch.dict(os.environ, TRANSFORMERS_SDPA_FORCE_GQA="1") if SDPA_GQA_DECODE else contextlib.nullcontext():
            logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, cache=self.cache,
                           use_cache=True).logits[:, -1]
        return sample_token(without_banned(logits, banned), temperature, top_p, u)


POOL_ATTENTION = "ares_pool"  # the decode step's attention function, registered with Hugging Face by KVPool


def pool_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention of one query token per row over the pool's keys: the query heads of each KV head side by side
    (B, kv heads, group, D), so SDPA reads every key once for the whole group (Hugging Face's compiled path copies
    each KV head per query head) and takes the pool's mask as it is. query (B, heads, 1, D), key and value
    (B, kv heads, L, D), attention_mask (B, 1, 1, L) bool -> (B, 1, heads, D)."""
    B, H, _, D = query.shape
    group = query.reshape(B, key.shape[1], H // key.shape[1], D)  # head h belongs to KV head h // (H / kv heads)
    out = F.scaled_dot_product_attention(group, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, 1, H, D), None


@contextlib.contextmanager
def attention_implementation(config, name: str):
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def text_decoder(model) -> nn.Module:
    """The decoder stack without the output head: the language model of a VLM, `.model` of a causal LM."""
    return getattr(model.model, "language_model", model.model)


def pool_step(model, pool, tok, pos, slot, cols, u, temperature: float, top_p: float, banned):
    """KVPool's decode step, compiled once: each row's last token tok (B,) at rotary position pos, its keys and values
    written at column slot (B,), attention over the columns cols (Lb,) up to its own, then the next token sampled."""
    pool.slot, pool.cols = slot, cols  # inputs: nothing the graph makes is kept outside it (a CUDA graph's memory)
    mask = (cols[None] <= slot[:, None])[:, None, None]  # (B, 1, 1, Lb): the prompt, the tokens so far, itself
    h = text_decoder(model)(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, cache=pool,
                            use_cache=True).last_hidden_state[:, -1]  # (B, H)
    return sample_token(without_banned(model.get_output_embeddings()(h), banned), temperature, top_p, u)


@functools.cache
def compiled_pool_step(backend: str, cuda_graphs: bool):
    """pool_step compiled once per process. Rows and key length are marked dynamic at every call, so every bucket runs
    the one graph (on a GPU, each (rows, length) bucket records its CUDA graph once)."""
    return torch.compile(pool_step, backend=backend, mode="reduce-overhead" if cuda_graphs else None)


def buckets(top: int, smallest: int, steps: tuple = (1,)) -> list[int]:
    """smallest * s * 2^k for s in steps, below top, then top: buckets(20, 2) = [2, 4, 8, 16, 20],
    buckets(352, 64, (1, 1.5)) = [64, 96, 128, 192, 256, 352]."""
    return sorted({int(smallest * s * 2 ** k) for k in range(48) for s in steps if smallest * s * 2 ** k < top}) + [top]


class KVPool:
    """The sampler's KV cache under --compile: per decoder layer one key and one value tensor of (rows + 1, KV heads,
    length + 1, head dim), allocated at the first call and reused by every sample() call of the run, so the compiled
    decode step (and a GPU's CUDA graphs) always reads and writes the same memory. A row holds its prompt (+ prefix)
    from column 0, then its new tokens. A call's rows sit in the first B pool rows, B the smallest row bucket that holds
    them (2, 4, 8, ..., rows); at a check, once the live rows fit a smaller bucket, they move there (keep). Attention
    reads the first Lb columns, Lb the smallest length bucket (64, 96, 128, 192, ..., length) that holds every live
    row's tokens up to the next check. One row and column more than it uses: no slice spans a whole tensor (a compiled
    graph would fix that size), and the spare column takes the writes of finished rows past the length. Hugging
    Face's layers see the pool as their cache (update). compile=False runs the same step eagerly."""

    def __init__(self, rows: int, length: int, compile: bool = True, backend: str = "inductor",
                 cuda_graphs: bool = False):
        from transformers import AttentionInterface

        AttentionInterface.register(POOL_ATTENTION, pool_attention)
        self.capacity, self.length, self.compile = max(rows, 2), length, compile
        self.row_buckets, self.length_buckets = buckets(self.capacity, 2), buckets(length, 64, (1, 1.5))
        self.step_fn = compiled_pool_step(backend, cuda_graphs) if compile else pool_step
        self.cuda_graphs, self.keys, self.values = cuda_graphs, [], []  # per layer (rows + 1, KV heads, length + 1, D)

    def check(self, lens: torch.Tensor, budgets: torch.Tensor):
        """Before a call's prefill: its N rows (budgets (N,)) of lens (N,) prompt + prefix tokens fit the pool."""
        if len(budgets) > self.capacity or int((lens + budgets).max()) > self.length:
            raise ValueError(f"KVPool of {self.capacity} rows x {self.length} tokens: a call of {len(budgets)} rows "
                             f"needs {int((lens + budgets).max())} tokens a row (--rollout-batch, --max-prompt-len and "
                             "--max-response-len size the pool)")

    def write(self, cache, att: torch.Tensor, first: int, repeats: int):
        """A part of a call's prompts as prefill() runs it: its KV cache (p rows, left-padded; att (p, Lp)) into pool
        rows first .. first + p x repeats, each row's keys and values from column 0 (row first + i takes prompt
        i // repeats): the call's whole prefill cache never exists beside the pool."""
        (p, Lp), device = att.shape, att.device
        if not self.keys:  # the first call: allocate, at a fixed address (CUDA graphs replay on it)
            for layer in cache.layers:
                for store, x in ((self.keys, layer.keys), (self.values, layer.values)):
                    store.append(x.new_zeros(self.capacity + 1, x.shape[1], self.length + 1, x.shape[3]))
                    torch._dynamo.mark_static_address(store[-1])
            self.columns = torch.arange(self.length + 1, device=device)
        lens = att.sum(1).repeat_interleave(repeats)  # (n,) tokens of each row's prompt + prefix
        src = torch.arange(p, device=device).repeat_interleave(repeats)  # (n,) the prompt of each row
        shift = (self.columns[None, :Lp] + (Lp - lens)[:, None]).clamp(max=Lp - 1)  # (n, Lp): real tokens first
        rows = slice(first, first + p * repeats)
        for layer, K, V in zip(cache.layers, self.keys, self.values):
            for pooled, kv in ((K, layer.keys), (V, layer.values)):
                pooled[rows, :, :Lp] = kv[src].gather(2, shift[:, None, :, None].expand(-1, kv.shape[1], -1, kv.shape[3]))

    def start(self, model, state: dict, budgets: torch.Tensor):
        """A call whose prompts prefill() has written into the pool (write): its N = P x repeats rows decode from
        here. -> self, with rows (B,): the output row of each batch row (N for a padding row)."""
        att = state["att"]  # (P, Lp): the real tokens of each prompt, left-padded
        N, P, device = len(budgets), len(att), att.device
        lens = att.sum(1).repeat_interleave(N // P)  # (N,) tokens of each row's prompt + prefix
        B = next(b for b in self.row_buckets if b >= N)
        self.rows = torch.cat([torch.arange(N, device=device), torch.full((B - N,), N, device=device)])  # (B,)
        self.lens = torch.cat([lens, lens.new_zeros(B - N)])  # (B,)
        self.set_length(int(lens.max()), 0)
        return self

    def set_length(self, longest: int, t: int):
        """Lb: the columns that the next CHECK_EVERY decode steps from step t read, for prompts of up to `longest`."""
        self.Lb = next(b for b in self.length_buckets if b >= min(longest + t + CHECK_EVERY, self.length))

    def keep(self, live: torch.Tensor, t: int) -> torch.Tensor | None:
        """At a check (live (B,)): the batch rows that stay, live ones first, padded with finished ones to the smallest
        bucket that holds them, or None when that is the bucket they are in; their pool rows move to the front."""
        n = int(live.sum())
        self.set_length(int(self.lens[live].max()), t)
        B = next(b for b in self.row_buckets if b >= n)
        if B >= len(live):
            return None
        keep = torch.cat([live.nonzero()[:, 0], (~live).nonzero()[:, 0][:B - n]])  # (B,)
        for pooled in self.keys + self.values:  # the columns written so far (Lb holds them)
            pooled[:B, :, :self.Lb] = pooled[keep, :, :self.Lb]
        self.lens = self.lens[keep]
        return keep

    def step(self, model, tok, pos, u, t: int, temperature: float, top_p: float, banned):
        """Decode step t of the batch rows: writes at column len + t (finished rows past the length: the spare one)."""
        slot, cols = (self.lens + t).clamp(max=self.length), self.columns[:self.Lb]
        if self.compile:  # one graph for every bucket
            for x, dim in ((tok, 0), (slot, 0), (u, 0), (cols, 0), (pos, pos.dim() - 2)):
                torch._dynamo.mark_dynamic(x, dim)
        if self.cuda_graphs:  # the last step's outputs are copied: its graph's memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with attention_implementation(text_decoder(model).config, POOL_ATTENTION):
            return self.step_fn(model, self, tok, pos, slot, cols, u, temperature, top_p, banned)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Hugging Face's cache call in each attention layer: write the step's keys and values (B, KV heads, 1, D) at
        each row's column, return the first B rows x Lb columns."""
        K, V, rows = self.keys[layer_idx], self.values[layer_idx], torch.arange(len(key_states), device=key_states.device)
        K[rows, :, self.slot], V[rows, :, self.slot] = key_states[:, :, 0], value_states[:, :, 0]
        return K[:len(key_states), :, :len(self.cols)], V[:len(key_states), :, :len(self.cols)]


def kv_bytes_per_token(text_config, dtype) -> int:
    """Bytes of keys and values that one token takes in all decoder layers."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


def activation_bytes(text_config, tokens: int, rows: int, checkpointing: bool) -> int:
    """Estimated activations of one update micro-batch of `tokens` tokens in `rows` rows: with checkpointing, each
    layer's fp32 input plus one layer's recompute (6 hidden + 4 MLP-width values a token, bf16), else every layer's;
    plus the log-prob head's (rows, 1024, vocab) fp32 chunk three times (logits, softmax, gradient)."""
    h, L, f, V = (getattr(text_config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    layer = tokens * (6 * h + 4 * f) * 2
    return (L * tokens * h * 4 + layer if checkpointing else L * (tokens * h * 4 + layer)) + 3 * rows * 1024 * V * 4


def prefill_bytes(text_config, tokens: int, length: int, dtype) -> int:
    """Estimated peak of one prefill forward (prefill: no gradients) of `tokens` tokens in rows of `length`, beside the
    call's KV cache, which a branch call's long prefixes can fill: the part's own keys and values (copied into the
    call's cache after the forward), a layer's largest temporaries, the MLP's three (tokens, intermediate) tensors
    (act(gate), up, their product) beside four (tokens, hidden) ones (the embeddings, the layer's input, the residual,
    the MLP's normed input), and the attention mask of left-padded rows, (rows, 1, length, length) bool, plus the copy
    in the query's dtype that SDPA makes of it during attention: counted beside the MLP's, an upper bound (README:
    memory plan; measured on the CPU)."""
    h, f, size = text_config.hidden_size, text_config.intermediate_size, torch.finfo(dtype).bits // 8
    return tokens * (kv_bytes_per_token(text_config, dtype) + size * (3 * f + 4 * h) + length * (1 + size))


RESERVE_GIB = 5.0  # kept free: CUDA context, NCCL buffers, allocator fragmentation, the sampler's logits (README: memory plan)


def kv_room(free: float, trainable: int, params: int, shard: int, activations: float, pool: bool,
            adam_made: bool = False, grads_made: bool = False, prefill: float = 0) -> float:
    """Bytes for the rollout KV cache (README: memory plan): the free memory less RESERVE_GIB, AdamW's two fp32
    moments (8 B a trainable weight, per shard, unless made) and the larger of what the update will still allocate and
    what sampling holds beside the KV cache. The update: fp32 gradients (4 B a trainable weight, per shard; DDP's
    buckets hold them from the start), with a KV pool (--compile: it stays allocated through the update) a
    micro-batch's activations. Sampling: a prefill forward's peak (prefill_bytes: a branch call's prefill runs beside
    a KV cache that may fill the room), with FSDP (shard > 1) also the bf16 weights it gathers (2 B a weight)."""
    adam = 0 if adam_made else 8 * trainable / shard
    update = (0 if grads_made else 4 * trainable / shard) + (activations if pool else 0)
    return free - RESERVE_GIB * 2 ** 30 - adam - max(update, (2 * params if shard > 1 else 0) + prefill)


def pool_bytes(rows: int, per_token: int, row_tokens: int) -> int:
    """What KVPool(rows, row_tokens) allocates: its rows (at least 2) and a spare one, of row_tokens + 1 columns."""
    return (max(rows, 2) + 1) * (row_tokens + 1) * per_token


def pool_rows(room: float, per_token: int, row_tokens: int) -> int:
    """The most rows whose KVPool (pool_bytes: a spare row and column beyond them) fits in `room` bytes; 0 if none does.
    Example: room for 10 pool rows -> 9; for 2 -> 0 (the smallest pool takes 3)."""
    fit = int(room // ((row_tokens + 1) * per_token))  # pool rows, the spare included
    return fit - 1 if fit >= 3 else 0


def free_memory(device) -> int:
    """Bytes free on the device, PyTorch's cached but unused blocks included; on a CPU, the host's MemAvailable."""
    if device.type == "cuda":
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def rollout_memory(cfg, run, device):
    """--rollout-batch auto, by the memory plan's formula (README: memory plan): the rows whose KV cache
    (--max-prompt-len + --max-response-len tokens each) fits in the free memory of the device (of the host on a CPU)
    beside RESERVE_GIB and what the update will still allocate: gradients and, before the first step, AdamW's
    moments; with --compile (the pool stays allocated through the update) also a micro-batch's activations; with
    --fsdp at least the weights that sampling gathers (kv_room). At most the rows that a step decodes at once, the
    smallest over ranks; printed. A resume keeps the value the run started with (its training state): a step's
    draws depend on how its rows are split into sampler calls, and the free memory differs from one start to the
    next (AdamW's moments are already allocated then). A warning when a micro-batch of full rows (--micro-batch-size x
    (--max-prompt-len + --max-response-len) tokens) would need more activations than the update has left on the GPU
    (the KV pool's taken with --compile). -> the run's KVPool of that many rows with --compile, else None."""
    text, shard = run.hf.config.get_text_config(), world_size() if sharded(cfg) else 1
    row_tokens, G, B = cfg.max_prompt_len + cfg.max_response_len, cfg.group_size, cfg.branch_samples
    per_token = kv_bytes_per_token(text, compute_dtype(cfg, device))
    step_rows = -(-cfg.batch_size // world_size()) * max(G - B, B)  # a step's largest sampler call
    if cfg.rollout_batch == "auto" and "rollout_batch" in run.state:
        cfg.rollout_batch = run.state["rollout_batch"]
        rank0_print(f"--rollout-batch auto: {cfg.rollout_batch} rows per rank, as the run started with (a step's "
                    "samples depend on it)")
    free, made = free_memory(device), (bool(run.opt.state), isinstance(run.model, nn.parallel.DistributedDataParallel))
    acts = activation_bytes(text, cfg.micro_batch_size * row_tokens, cfg.micro_batch_size, cfg.grad_checkpointing)
    if cfg.rollout_batch == "auto":  # a prefill forward reads up to a micro-batch of full rows (rollout_groups)
        prefill = prefill_bytes(text, cfg.micro_batch_size * row_tokens, row_tokens, compute_dtype(cfg, device))
        room = kv_room(free, run.n_trainable, run.n_params, shard, acts, cfg.compile, *made, prefill=prefill)
        # --compile: the KV pool holds a spare row and column beyond its rows (pool_bytes); they come out of the room too
        fit = pool_rows(room, per_token, row_tokens) if cfg.compile else int(room // (per_token * row_tokens))
        rows = torch.tensor([float(max(1, min(step_rows, fit)))])
        cfg.rollout_batch = int(all_reduce(rows, dist.ReduceOp.MIN if dist.is_initialized() else None).item())
        rank0_print(f"--rollout-batch auto: {cfg.rollout_batch} rows per rank ({room / 2 ** 30:.1f} GiB for KV of "
                    f"{free / 2 ** 30:.1f} GiB free; {per_token:,} B/token x {row_tokens:,} tokens a row; at most "
                    f"{step_rows}, a step's largest call)" + ("" if fit >= 1 else ": the update "
                    "alone may not fit: consider --fsdp, --grad-checkpointing, a smaller --micro-batch-size or "
                    "--max-response-len"))
    cfg.rollout_batch = run.state["rollout_batch"] = int(cfg.rollout_batch)
    # the update's own room: what AdamW's moments, gradients not yet made and (--compile) the KV pool leave of it
    left = (free - RESERVE_GIB * 2 ** 30 - (0 if made[0] else 8 * run.n_trainable / shard)
            - (0 if made[1] else 4 * run.n_trainable / shard)
            - (pool_bytes(cfg.rollout_batch, per_token, row_tokens) if cfg.compile else 0))
    # a GPU's (RESERVE_GIB is CUDA's); it fires for the defaults at real size: 2 rows of 20k tokens, ~170 GiB for 3B
    if device.type == "cuda" and acts > left:
        rank0_print(f"warning: an update micro-batch of --micro-batch-size {cfg.micro_batch_size} rows of --max-prompt-len "
                    f"+ --max-response-len tokens ({cfg.micro_batch_size * row_tokens:,}) needs about {acts / 2 ** 30:.1f} "
                    f"GiB of activations{'' if cfg.grad_checkpointing else ' without --grad-checkpointing'}, and "
                    f"{max(left, 0) / 2 ** 30:.1f} GiB are left for them: long responses will run out of memory; use "
                    "--grad-checkpointing, a smaller --micro-batch-size or --max-response-len, or --fsdp")
    if not cfg.compile:
        return None
    graphs_compiled()  # the per-step counts of this run start here
    fsdp = sharded(cfg)  # FSDP's hooks stay outside torch.compile; its gathered weights move
    return KVPool(cfg.rollout_batch, row_tokens, compile=not fsdp, backend=cfg.compile_backend,
                  cuda_graphs=device.type == "cuda" and cfg.compile_backend == "inductor" and not fsdp)


def graphs_compiled() -> dict:
    """torch.compile's graphs compiled since the last call (logged per AEPO step with --compile: 0 once warm)."""
    from torch._dynamo.utils import counters

    total = counters["stats"]["unique_graphs"]
    new, GRAPHS_SEEN[0] = total - GRAPHS_SEEN[0], total
    return dict(graphs_compiled=new)


GRAPHS_SEEN = [0]



# ----------------------------------------------------------------------------------------------------------
# Training: wrapping (DDP or FSDP2), optimizer, data order, the run's state.


def filter_prompts(processor, records: list[dict], max_len: int, source: str) -> list[dict]:
    try:
        lengths = [data_prep.prompt_length(processor, r) for r in records]
    except DataError as e:  # e.g. a record with images for a text-only model: say which file it is in
        raise DataError(f"{source}: {e}") from None
    kept = [r for r, n in zip(records, lengths) if n <= max_len]
    if len(kept) < len(records):
        rank0_print(f"dropped {len(records) - len(kept)} of {len(records)} prompts longer than {max_len} tokens")
    if not kept:
        raise DataError(f"{source}: every prompt is longer than --max-prompt-len {max_len} tokens (the shortest has "
                        f"{min(lengths)}, images included): raise --max-prompt-len, or lower --max-pixels")
    return kept


def filter_traces(processor, records: list[dict], max_len: int, source: str) -> list[dict]:
    """The cold start's records whose trace fits --max-response-len, each with its `response_ids` (the trace's tokens
    and the end of turn)."""
    tok = tokenizer_of(processor)
    eot = special_ids_of(tok)["eot"]
    ids = [tok(r["response"], add_special_tokens=False)["input_ids"] + [eot] for r in records]
    kept = [dict(r, response_ids=x) for r, x in zip(records, ids) if len(x) <= max_len]
    if len(kept) < len(records):
        rank0_print(f"dropped {len(records) - len(kept)} traces longer than --max-response-len {max_len}")
    if not kept:  # not the batch check's "0 usable records", which would blame --batch-size
        raise DataError(f"{source}: every trace is longer than --max-response-len {max_len} tokens (the shortest has "
                        f"{min(map(len, ids))}, its end-of-turn token included)")
    return kept


def start_stage(cfg: Config, stage: str):
    """What both stages do first: fill and check the stage's defaults, join the process group, seed, read and check
    every record and --eval-data's (bad data fails before the model loads), claim --out (its lock; a run already
    there), take the commit a hub --model or --ref-model is read at (model_commits), measure the data's lengths and
    check the batch against them and that the model can read --eval-data's prompts (the processor alone), only then
    let --overwrite delete the old run, write the run record <out>/config.json (on --resume, changed flags stop here,
    then a --steps below the newest step checkpoint's), load the policy.
    -> (cfg, run, records, world, device)."""
    own_suffix = cfg.prompt_suffix is None  # the model's own: a hub model's is read again at its commit, below
    cfg = validate_config(resolve_stage_defaults(cfg, stage))  # the stage defaults just filled in, too
    if cfg.deterministic:
        make_deterministic()
    split = cfg.split if "split" in cfg.given or not cfg.preset else None  # a preset has its own split
    records = data_prep.read_records(cfg.data, split, cfg.preset, need_response=stage == "coldstart")
    try:
        held_out = data_prep.read_records(cfg.eval_data, data_prep.held_out_split(cfg.eval_data)) if cfg.eval_every else []
    except DataError as e:
        raise DataError(f"--eval-data: {e}") from None
    read = dict(data=records, eval_data=held_out)  # for their fingerprints, every record: before any is filtered
    me, world, device = init_distributed(cfg.dist_timeout)  # after the data, whose errors are every rank's
    random.seed(cfg.seed + me)
    np.random.seed(cfg.seed + me)
    torch.manual_seed(cfg.seed + me)
    rank0_decides(claim_out, cfg)  # a run already in --out, or another one running there, stops this one here
    ckpt = latest_checkpoint(Path(cfg.out)) if cfg.resume else None  # under the lock: no other run deletes it now
    commits = from_rank0(rank0_decides(model_commits, cfg))  # a hub model's commit (--resume: the run's), every rank
    if own_suffix and commits.get("model"):  # main's was read above: the commit's, as the run record compares it
        cfg.prompt_suffix = model_prompt_suffix(cfg.model, commits["model"])
    processor = training_processor(cfg, ckpt, commits.get("model"))  # checks the data's lengths before the weights load
    records = filter_prompts(processor, records, cfg.max_prompt_len, cfg.data)
    for r in held_out:  # one the model cannot read (images for a text-only model) was a silent 0% at every validation
        try:
            data_prep.prompt_text(processor, r)
        except DataError as e:
            raise DataError(f"--eval-data: {cfg.eval_data}: {e}") from None
    if stage == "coldstart":
        records = filter_traces(processor, records, cfg.max_response_len, cfg.data)
    check_batch(cfg, len(records), "records" if stage == "coldstart" else "prompts")
    last = last_step(cfg, len(records))  # then the run record's checks; --overwrite deletes the old run only after them
    record = rank0_decides(check_run_record, cfg, RESUMABLE, ckpt, last, read, commits)  # one rank reads the files
    if cfg.resume and ckpt is None:
        rank0_print(f"--resume: no complete checkpoint in {cfg.out}: starting fresh")
    run = dataclasses.replace(load_for_training(cfg, device, ckpt, processor, commits.get("model")),
                              record=record or {}, held_out=held_out, commits=commits)
    return cfg, run, records, world, device


def last_step(cfg, n_records: int) -> int:
    """The stage's last step: --steps, else (the cold start) --epochs over the records in whole batches."""
    return cfg.steps or cfg.epochs * (n_records // cfg.batch_size)


def sharded(cfg) -> bool:
    """--fsdp under torchrun (even at world size 1). Without a process group --fsdp is a plain model, in autocast."""
    return cfg.fsdp and dist.is_initialized()


def decoder_blocks(hf: nn.Module) -> list[nn.Module]:
    """Transformer blocks of the language model and the vision tower: the units FSDP shards one by one."""
    return [m for m in hf.modules() if type(m).__name__.endswith(("DecoderLayer", "VisionBlock"))]  # Qwen, Llama, ...


def wrap_policy(hf: nn.Module, cfg: Config, device, trainable: bool = True):
    """Policy (or reference, trainable=False) wrapped for this world: FSDP2 shards every block then the root, with
    bf16 compute and fp32 reduction; DDP otherwise. Returns (module to call, inner Policy)."""
    policy = Policy(hf)
    if not trainable:
        for p in policy.parameters():
            p.requires_grad_(False)
    dtype = compute_dtype(cfg, device)
    if cfg.compile and trainable and cfg.stage == "coldstart":  # AEPO compiles its decode step instead (KVPool);
        compile_layers(hf, cfg.compile_backend)  # under FSDP, each layer's hooks (its gathers) stay outside the graph
    if sharded(cfg):  # under torchrun even at world size 1: one GPU runs the path of eight
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        skeleton = any(p.is_meta for p in hf.parameters())  # load_for_fsdp's: filled by fill_shards or a resume
        for block in decoder_blocks(hf):
            fully_shard(block, mp_policy=mp)
        fully_shard(policy, mp_policy=mp)
        policy.vision_every_rank = hasattr(getattr(hf, "model", None), "visual")  # a rank without images joins too
        if skeleton:
            policy.to_empty(device=device)  # allocates this rank's shards
        return policy, policy
    if trainable and dist.is_initialized():
        ddp = nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=cfg.train_vision,
                                                  gradient_as_bucket_view=True)  # the gradients live in DDP's buckets
        return ddp, policy
    return policy, policy


def fill_shards(policy: Policy, full: nn.Module | None):
    """The sharded policy's weights from rank 0's full model (None on the other ranks), one tensor at a time, and
    the buffers that no state dict holds (rotary frequencies), which the meta skeleton left unset."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = {f"hf.{k}": v for k, v in full.state_dict().items()} if full is not None else {}
    set_model_state_dict(policy, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = dict(full.named_buffers()) if full is not None else {}
    for name, buf in policy.hf.named_buffers():
        if full is not None:
            buf.copy_(buffers[name])
        dist.broadcast(buf, 0)


def compile_layers(hf: nn.Module, backend: str):
    """--compile for the cold start: each decoder layer compiled once for any batch and length (dynamic shapes), the
    graphs shared by all layers. Calls with a KV cache (the sampler's prefill, AEPO's shared-prompt update) run eagerly:
    a cache is indexed by layer, which would compile a graph per layer."""
    for layer in (m for m in hf.modules() if type(m).__name__.endswith("DecoderLayer")):
        layer.forward = functools.partial(without_cache_compiled, layer.forward,
                                          torch.compile(layer.forward, backend=backend, dynamic=True))
    graphs_compiled()  # the per-step counts of this run start here


def without_cache_compiled(eager, compiled, *args, **kwargs):
    return (eager if kwargs.get("cache") is not None else compiled)(*args, **kwargs)


@contextlib.contextmanager
def autocast(cfg: Config, device):
    dtype = compute_dtype(cfg, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and not sharded(cfg)):  # FSDP2 casts
        yield


@contextlib.contextmanager
def gathered(policy: nn.Module):
    """Full parameters for sampling: FSDP2 unshards every block once (instead of all-gathering every decode
    step) and reshards afterwards; without FSDP there is nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    blocks = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    if isinstance(policy, FSDPModule):  # sampling calls blocks directly: make the policy FSDP's root first
        policy._get_fsdp_state()._lazy_init()
    for m in blocks:
        m.unshard()
        if m is not policy:
            m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in blocks:
            if m is not policy:
                m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def make_optimizer(params, cfg: Config, total_steps: int):
    """AdamW, linear warm-up, then cosine decay to 10% (coldstart) or constant (AEPO, as in the paper; --lr-schedule)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, int(0.03 * total_steps))
    plan = dict(total=total_steps, warm=warm)  # kept in the training state: a resumed run keeps its first plan

    def factor(step):
        if step < plan["warm"]:
            return (step + 1) / plan["warm"]
        if cfg.lr_schedule == "constant":
            return 1.0
        done = (step - plan["warm"]) / max(1, plan["total"] - plan["warm"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))  # past the plan: its final 10%

    factor.plan = plan  # on the function, which the scheduler's state_dict leaves out (its own attributes go in)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def wait_for_device(device):
    """Wait for the GPU's queued kernels, so that a clock read after it times them (a CPU runs each op as it comes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_step(opt, sched, params, clip: float, model=None) -> tuple[float, bool]:
    """Clip, step, schedule. A non-finite gradient norm skips the update (and is reported). Under DDP the gradients
    are zeroed in place, not freed: they are views of DDP's buckets, and a freed one comes back as a second tensor
    beside its bucket in every no_sync micro-batch (twice the gradients' memory). (Under FSDP2 a trained vision tower
    always gets a gradient, zero on a step without images: see encode_images.)"""
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    ok = math.isfinite(norm)
    if ok:
        opt.step()
    sched.step()
    in_buckets = isinstance(model, nn.parallel.DistributedDataParallel) and not model.find_unused_parameters
    opt.zero_grad(set_to_none=not in_buckets)  # --train-vision (find_unused_parameters): None, so AdamW skips a weight
    # that no rank used this step (a zero gradient would still move it by momentum and weight decay)
    return norm, ok


def largest_norm(norms: list[float]) -> float | None:
    """A step's grad_norm: the largest of its updates' norms, NaN where one was NaN (max() keeps or drops a NaN by its
    place in the list, so a skipped update's NaN could log as a finite norm); None for a step with no update."""
    return math.nan if any(math.isnan(n) for n in norms) else max(norms, default=None)


DIVERGED_AFTER = 3  # steps in a row whose every update had a non-finite loss or gradient norm


def stop_if_diverged(state: dict, step: int, bad: bool, lr: float):
    """One non-finite step is skipped (optimizer_step) and the run goes on. Several in a row mean the weights
    themselves are broken (a learning rate far too high): every later update would be skipped too, and the
    checkpoints would save the broken weights. Stop with one line, before any of them is saved. The count is
    trainer state, so a resumed run counts on where it stopped."""
    state["nonfinite_steps"] = state.get("nonfinite_steps", 0) + 1 if bad else 0
    if state["nonfinite_steps"] >= DIVERGED_AFTER:
        raise SystemExit(f"step {step}: the loss or gradient norm was not finite in {DIVERGED_AFTER} steps in a row: "
                         f"the run diverged and stopped (no final checkpoint); lower --lr (this step's: {lr:g}) and start "
                         "again, from a checkpoint saved before the divergence if there is one")


def sync_context(model, last: bool):
    """DDP: gradient sync only on the last micro-batch of an optimizer step (no_sync: the others add into DDP's
    buckets). FSDP2 reduce-scatters every micro-batch: without the sync it would keep a full-size fp32 gradient of
    every weight on every rank until the last micro-batch, memory the plan (kv_room) gives to the KV cache."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def make_deterministic():
    """--deterministic (README: determinism): torch's deterministic kernels wherever it has one (index_add, scatter_add,
    gather's and index_select's backward on a GPU, ...) and cuBLAS's fixed workspace, set before its first call;
    cuDNN's autotuner off (it may pick another kernel per run). An op with no deterministic CUDA kernel still runs,
    with a warning (warn_only): here the sampler's floating-point cumsum, which a strict mode would stop at the
    first token."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def step_seed(cfg: Config, step: int) -> int:
    """The seed of this rank's sampling noise and update order at a step: the same run after a resume."""
    return cfg.seed * 1_000_003 + step * world_size() + rank()


def step_batch(n: int, step: int, batch: int, seed: int) -> list[int]:
    """The records of a global step, all ranks': the step's slice of its epoch's permutation."""
    per_epoch = n // batch
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + step // per_epoch))
    return order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch].tolist()


def step_indices(n: int, step: int, batch: int, seed: int) -> list[int]:
    """This rank's records for a global step: its share of step_batch, dealt round-robin."""
    return step_batch(n, step, batch, seed)[rank()::world_size()]


def check_batch(cfg: Config, n_records: int, what: str):
    if cfg.batch_size % world_size():
        raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the number of ranks {world_size()}")
    if n_records < cfg.batch_size:
        raise SystemExit(f"--batch-size {cfg.batch_size} is larger than the {n_records} usable {what}")


@dataclass
class Run:
    """What a training stage holds: load_for_training fills the first fields, prepare_training the rest."""
    hf: nn.Module  # the Hugging Face model: fp32 master weights (a skeleton of shards under FSDP)
    processor: object  # its tokenizer and image processor
    ids: dict  # special_ids(): pad, end-of-turn, stop set, image token
    out: Path = Path("runs/ares")  # --out: checkpoints and metrics.jsonl
    ckpt: Path | None = None  # the checkpoint this run resumes from
    full: nn.Module | None = None  # FSDP: rank 0's full model until fill_shards() has sent it
    model: nn.Module | None = None  # what the loop calls: the Policy, wrapped in DDP or sharded by FSDP2
    policy: Policy | None = None  # the Policy inside it (state dicts, checkpoints)
    params: list = field(default_factory=list)  # the trainable parameters
    opt: torch.optim.Optimizer | None = None
    sched: object = None  # the learning-rate schedule
    total: int = 0  # optimizer steps of the whole run
    state: dict = field(default_factory=dict)  # what a checkpoint restores besides weights: step, AEPO's targets, kappa
    n_params: int = 0
    n_trainable: int = 0
    n_lm: int = 0  # the language model's parameters (outside the vision tower), and those of them that train
    n_lm_trained: int = 0
    record: dict = field(default_factory=dict)  # <out>/config.json (rank 0, which logs it; {} on the other ranks)
    held_out: list = field(default_factory=list)  # --eval-data's records (validated every --eval-every AEPO steps)
    commits: dict = field(default_factory=dict)  # --model's and --ref-model's hub commits (model_commits), every rank


def training_processor(cfg: Config, ckpt: Path | None, revision: str | None = None):
    """The processor of the model that trains (--model, a hub model's at the commit `revision`, or the checkpoint a
    --resume starts from), with --prompt-suffix."""
    processor = processor_for(str(ckpt), cfg) if ckpt else processor_for(cfg.model, cfg, revision)
    vision_flags = [f for f in ("train_vision", "min_pixels", "max_pixels") if f in cfg.given]
    if vision_flags and not hasattr(processor, "image_processor"):  # a tokenizer alone: a text-only model
        raise vision_flag_unused(vision_flags[0], f"--model {cfg.model} is a text-only model")
    if cfg.prompt_suffix is not None:
        processor.prompt_suffix = cfg.prompt_suffix
    return processor


def vision_flag_unused(flag: str, which: str) -> SystemExit:
    """The one line for a vision flag (`flag`, a field name) where no model takes images: `which` says so ('--model M
    is a text-only model'). Training, eval.py and its passrate stop with it."""
    return SystemExit(f"--{flag.replace('_', '-')}: {which} (no vision tower, no images), so the flag would do "
                      "nothing: leave it out")


def load_for_training(cfg: Config, device, ckpt: Path | None = None, processor=None, revision: str | None = None):
    """The policy's weights (fp32 master copy), from the newest checkpoint `ckpt` when resuming, else --model's (a hub
    model's at the commit `revision`), and its processor (training_processor's, unless given)."""
    processor = processor or training_processor(cfg, ckpt, revision)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    name, at = (str(ckpt), None) if ckpt else (cfg.model, revision)  # a checkpoint: a folder of ours
    master = dataclasses.replace(cfg, dtype="fp32")
    if sharded(cfg):  # a resume reads its shards from state/: nothing to send then
        hf, processor, full = load_for_fsdp(name, master, device, processor, fill=not ckpt, revision=at)
    else:
        (hf, processor), full = load_model(name, master, device, processor=processor, revision=at), None
    hf = make_trainable(hf, cfg, revision)  # LoRA: the adapter names --model's commit, on a resume too
    if cfg.prompt_suffix is not None:  # saved with every checkpoint: eval.py and passrate prompt it the same way
        hf.config.ares_prompt_suffix = cfg.prompt_suffix
    return Run(hf=hf, processor=processor, ids=special_ids(hf, processor), out=out, ckpt=ckpt, full=full)


def prepare_training(cfg: Config, run: Run, device, total: int) -> Run:
    """Wrap (DDP/FSDP2), build the optimizer for `total` steps, restore the checkpoint's state if resuming."""
    run.model, run.policy = wrap_policy(run.hf, cfg, device)
    if sharded(cfg) and not run.ckpt:
        fill_shards(run.policy, run.full)
    run.full = None
    run.params = [p for p in run.policy.parameters() if p.requires_grad]
    run.opt, run.sched = make_optimizer(run.params, cfg, total)
    run.total = total
    run.state = restore_training_state(run.ckpt, run.policy, run.opt, run.sched) if run.ckpt else {"step": 0}
    if run.ckpt:
        rank0_print(f"resumed from {run.ckpt} at step {run.state['step']}")
    # --steps may change on --resume (to extend or shorten a run); the learning-rate schedule may not: a step computes
    # what it did in the first run. Past the first plan's steps the rate stays at its end (10% of --lr for cosine).
    plan = run.sched.lr_lambdas[0].plan
    if run.ckpt and "lr_plan" not in run.state:
        rank0_print(f"warning: {run.ckpt} holds no learning-rate plan (saved by an older ares.py): the schedule is "
                    f"planned over this run's {plan['total']} optimizer steps")
    first = run.state.setdefault("lr_plan", dict(plan))
    if first != plan:
        rank0_print(f"--steps {cfg.steps} on --resume: the learning-rate schedule stays the run's first, over "
                    f"{first['total']} optimizer steps (warm-up {first['warm']}), not {plan['total']}")
        plan.update(first)  # the optimizer's current rate came back with its state, under that plan
    run.n_params = sum(p.numel() for p in run.hf.parameters())  # DTensor.numel() is the global size
    run.n_trainable = sum(p.numel() for p in run.params)
    vision = {id(p): p.numel() for p in vision_params(run.hf)}
    run.n_lm = run.n_params - sum(vision.values())  # the language model, and what of it trains (MFU)
    run.n_lm_trained = sum(p.numel() for p in run.params if id(p) not in vision)
    return run


def finished(run: Run, last: int) -> bool:
    """Is this a --resume of a run that is already whole (its final/ at step `last` or past it)? Then there is
    nothing to train, and final/ stays as it is: saved again, it got a new COMPLETE record (a new time), so eval.py's
    cache and the --resume of a run started from it (fingerprint) took the same weights for another model."""
    done = run.ckpt is not None and run.ckpt.name == "final" and run.state["step"] >= last
    if done:
        rank0_print(f"--resume: {run.ckpt} is this run's final checkpoint, at step {run.state['step']} of {last}: "
                    "nothing to train, and it stays as it is (a larger --steps extends the run)")
    return done


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, resumable on any number of ranks.
# Rank 0 writes what is shared; each rank writes its own shards of the training state.


def training_state(policy, opt) -> dict:
    """What a checkpoint's state/ folder holds, as this rank sees it: the fp32 master weights and AdamW moments
    (this rank's shards under FSDP, the full tensors otherwise) and the buffers no state dict has."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(policy, opt)
    return {"model": model_sd, "optim": optim_sd, "buffers": dict(policy.named_buffers())}


CTRL_C = dict(seen=False, held=0, signal=signal.SIGINT)  # a Ctrl-C (or SIGTERM) arrived; open ctrl_c_after blocks


def on_ctrl_c(signum, frame):
    """The trainer's SIGINT and SIGTERM handler (a cluster's scheduler stops a job with SIGTERM, then kills it): Python's
    KeyboardInterrupt at once, except inside ctrl_c_after. It also remembers the signal, because library code can
    swallow the KeyboardInterrupt: torch.distributed.checkpoint turns it into its own exception (a traceback), and one
    raised inside a finalizer is printed and dropped."""
    CTRL_C.update(seen=True, signal=signum)
    if not CTRL_C["held"]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_after():
    """Hold a Ctrl-C until the block (a checkpoint being written) is done, then stop the run."""
    CTRL_C["held"] += 1
    try:
        yield
    finally:
        CTRL_C["held"] -= 1
    stop_if_ctrl_c()


def stop_if_ctrl_c():
    if CTRL_C["seen"] and not CTRL_C["held"]:
        raise KeyboardInterrupt


@ctrl_c_after()  # a Ctrl-C while it writes stops the run once the checkpoint is whole (README: run folders)
def save_checkpoint(out: Path, name: str, policy, opt, sched, processor, state: dict, keep_last: int):
    """<out>/<name>/: the HF model + processor (from_pretrained loads them), state/ (master weights, AdamW moments,
    buffers) in torch.distributed.checkpoint format, each rank writing its own shard, trainer_state.pt (scheduler,
    step, ARES controller state) and rng_<rank>.pt. Written to <name>.tmp, flushed to disk, then COMPLETE (the size
    of every file) and a rename, so a kill mid-save leaves the previous checkpoint intact and a damaged one is
    detected (latest_checkpoint). A write that fails (a full disk, a quota) ends the run with one line
    (`unwritable`); the checkpoints before it stay whole. Peak host memory: the full weights for the HF export, on
    rank 0 only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    me = rank()
    final, tmp = out / name, out / f"{name}.tmp"

    def wait_for_every_rank():  # a rank whose write failed has said why and left (gloo sees it at once; under NCCL,
        try:  # torchrun stops the ranks still waiting)
            barrier()
        except RuntimeError as e:
            raise SystemExit(f"rank {me} stopped while {final} was being written: another rank left or stalled "
                             f"({gloo_cause(e)})") from None

    try:
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        wait_for_every_rank()
        dcp.save(training_state(policy, opt), checkpoint_id=tmp / "state")  # fsyncs its files; a write that fails on
        # any rank raises CheckpointException on every rank. Then the full weights, one tensor at a time onto rank 0's
        # CPU (the other ranks get nothing): never the optimizer
        hf_sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rng = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),  # this rank's
                   cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)  # GPU only: a resume may
        torch.save(rng, tmp / f"rng_{me}.pt")  # see fewer GPUs
        data_prep.fsync(tmp / f"rng_{me}.pt")
        if me == 0:
            weights, adapter = hf_export(policy.hf, {k.removeprefix("hf."): v for k, v in hf_sd.items()})
            tied = tied_copies(policy.hf)  # gathered, a tied weight (lm_head = embed_tokens) is a copy of its own
            policy.hf.save_pretrained(tmp, state_dict={k: v for k, v in weights.items() if k not in tied})
            if adapter:
                save_adapter(policy.hf, adapter, tmp / "adapter")
            processor.save_pretrained(tmp)
            torch.save(dict(scheduler=sched.state_dict(), state=state), tmp / "trainer_state.pt")
        del hf_sd
        wait_for_every_rank()  # every rank's files are on disk
        if me == 0:
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            for f in files:
                data_prep.fsync(tmp / f)
            (tmp / "COMPLETE").write_text(json.dumps({"step": state["step"], "time": time.time(), "files": files}))
            data_prep.fsync(tmp / "COMPLETE")
    except (OSError, CheckpointException) as e:  # CheckpointException is a BaseException: past `except Exception`
        raise SystemExit(unwritable(final, tmp, e)) from None
    if me == 0:
        stale = out / f"{name}.old"  # the previous checkpoint of this name stays whole until the new one is in place:
        shutil.rmtree(stale, ignore_errors=True)  # a kill between the renames leaves it as <name>.old, still complete
        if final.exists():
            os.replace(final, stale)
        os.replace(tmp, final)
        data_prep.fsync(out)
        for left in checkpoint_folders(out, ".old"):  # this one, and any a kill left: older than the one just saved
            shutil.rmtree(left, ignore_errors=True)
        steps = checkpoint_folders(out, "", finals=False)
        for old in steps[:max(0, len(steps) - keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def unwritable(final: Path, tmp: Path, e: BaseException) -> str | int:
    """How a checkpoint whose write failed (a full disk, a quota) ends the run: one line, from one rank, saying which
    checkpoint, why and (with several ranks) on which rank. dcp's CheckpointException reaches every rank: rank 0
    speaks for the rank that failed and removes the .tmp, the others exit 1 without a word. An OSError is its own
    rank's: rank 0 removes the .tmp, another rank leaves it (rank 0 may still be writing there) and says so; a rank
    waiting for it in the checkpoint's barrier stops with a line of its own (save_checkpoint)."""
    me = where = rank()  # this rank, and the one whose write failed
    if not isinstance(e, OSError):  # CheckpointException: {rank: (its error, its traceback)}
        if me != 0:
            return 1
        where, (e, _) = next(iter(e.failures.items()))
    cause = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    on = f", on rank {where}" if world_size() > 1 else ""
    if me == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the space a full disk needs back
        left = f"{tmp.name} is removed and the checkpoints before it are whole; free the space"
    else:
        left = f"the checkpoints before it are whole; free the space (delete the half-written {tmp} too)"
    return f"checkpoint {final} could not be written ({cause}{on}): the run stopped, {left}, then continue with --resume"


def hf_export(hf, sd: dict) -> tuple[dict, dict]:
    """(HF weights, adapter) from the policy's full state dict (no LoRA: (sd, {})). Under LoRA the weights are the
    merged policy W + (alpha / r) B A under the model's own names, so that every loader (--model of the next stage,
    eval.py, passrate, from_pretrained) gets the model that was trained, without peft; the adapter, in peft's format
    (base_model.model.<module>.lora_A.weight, and with --train-vision the vision tower's own weights, peft's
    modules_to_save), applies to the starting model (README: LoRA). --resume reads neither: it restores base and
    adapters from state/."""
    if not hasattr(hf, "ares_lora"):
        return sd, {}
    lora = hf.ares_lora
    weights = {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}
    adapter = {"base_model.model." + k.replace(".default.", "."): v for k, v in sd.items() if ".lora_" in k}
    if getattr(lora, "modules_to_save", None):  # the trained tower: PeftModel.from_pretrained puts it in place
        adapter.update({"base_model.model." + k: v for k, v in weights.items() if ".visual." in f".{k}"})
    for k in (k for k in sd if ".lora_A." in k):
        name, A, B = k.split(".lora_A.")[0], sd[k].float(), sd[k.replace(".lora_A.", ".lora_B.")].float()  # (r, in), (out, r)
        W = weights[name + ".weight"]
        weights[name + ".weight"] = (W.float() + lora.lora_alpha / lora.r * B @ A).to(W.dtype)
    return weights, adapter


def tied_copies(hf: nn.Module) -> set[str]:
    """Names of the parameters that are another's (a tied output head, lm_head = embed_tokens, as in Qwen2.5-VL-3B),
    all but the first in module order. Their gathered copies are left out of model.safetensors, as save_pretrained
    leaves them out of a model's own state dict (it ties them again at load): else every export of a 3B model carried
    a second 1.2 GB embedding in fp32."""
    first, copies = {}, set()
    for name, p in hf.named_parameters(remove_duplicate=False):
        if id(p) in first:
            copies.add(name)
        first.setdefault(id(p), name)
    return copies


def save_adapter(hf, adapter: dict, folder: Path):
    """<checkpoint>/adapter/: adapter_model.safetensors and adapter_config.json, as peft's save_pretrained writes them."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({k: v.contiguous() for k, v in adapter.items()}, folder / "adapter_model.safetensors")
    hf.ares_lora.save_pretrained(folder)


def checkpoint_folders(out: Path, *suffixes: str, finals: bool = True) -> list[Path]:
    """The folders save_checkpoint writes in `out`, in name order: final/ (unless finals=False) and step_<digits>/,
    each with one of `suffixes` ("": whole, ".old": the one being replaced, ".tmp": the one being written). A folder
    of the user's beside them (step_backup1/, plots.old/) is never one: nothing here deletes or resumes it."""
    names = "(final|step_[0-9]+)" if finals else "step_[0-9]+"
    ends = "|".join(re.escape(s) for s in suffixes)
    return sorted(p for p in out.glob("*") if p.is_dir() and re.fullmatch(f"{names}({ends})", p.name))


def complete_record(ckpt: Path) -> dict | None:
    """A checkpoint's COMPLETE record ({step, files: {name: size}}), or None where it is unreadable (cut or emptied)."""
    try:
        record = json.loads((ckpt / "COMPLETE").read_text())
        return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None
    except (OSError, ValueError):
        return None


def damage(ckpt: Path) -> str | None:
    """Why a complete checkpoint cannot be trusted (its COMPLETE unreadable, a file missing or of another size than
    written), else None."""
    record = complete_record(ckpt)
    if record is None:
        return "its COMPLETE file is unreadable"
    for f, size in record.get("files", {}).items():
        if not (ckpt / f).is_file() or (ckpt / f).stat().st_size != size:
            return f"{f} is missing or truncated"
    return None


WARNED: set = set()  # the damaged checkpoints this process has warned of


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step whose files are intact (a .tmp folder or one without COMPLETE
    never counts); a damaged newer one is skipped with a warning."""
    done = [p for p in checkpoint_folders(out, "", ".old") if (p / "COMPLETE").exists()]
    for ckpt in sorted(done, key=lambda p: (complete_record(p) or {}).get("step", math.inf), reverse=True):  # an
        # unreadable COMPLETE first: it may be the newest, and its warning says why an older one is resumed
        problem = damage(ckpt)
        if problem is None:
            return ckpt
        if (ckpt, problem) not in WARNED:  # the run's checks and its resume both look: one warning
            WARNED.add((ckpt, problem))
            rank0_print(f"warning: checkpoint {ckpt} is damaged ({problem}): falling back to an older one")
    return None


def restore_training_state(path: Path, policy, opt, sched) -> dict:
    """Weights, optimizer, buffers (each rank reads its own shards), scheduler, RNG and ARES state of a checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = training_state(policy, opt)
    dcp.load(sd, checkpoint_id=path / "state")  # in place, buffers included
    set_state_dict(policy, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    saved = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    sched.load_state_dict(saved["scheduler"])
    rng_file = path / f"rng_{rank()}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, map_location="cpu", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if isinstance(rng["cuda"], torch.Tensor) and torch.cuda.is_available():  # a list: every GPU's (older checkpoints)
            torch.cuda.set_rng_state(rng["cuda"])  # the current device: this rank's
    return saved["state"]



# ----------------------------------------------------------------------------------------------------------
# Logging: metrics.jsonl, trackers, what an AEPO step logs, MFU, validation on held-out records.


class Metrics:
    """One JSON line per step in <out>/metrics.jsonl (on rank 0 only) and a tqdm bar. A resumed run keeps the lines up to
    its checkpoint's step (the later ones are re-run), rewritten atomically: a kill at any moment leaves either
    the old file or the new one whole."""

    def __init__(self, out: Path, total: int, start: int, desc: str, rank0: bool = True, tracker=None):
        self.rank0, self.tracker = rank0, tracker if rank0 else None  # open_tracker's: the rows to TensorBoard or W&B
        self.file = None
        if self.rank0:
            path = out / "metrics.jsonl"
            if start and path.exists():
                data_prep.write_atomically(path, "".join(json.dumps(r) + "\n" for r in logged_rows(path) if r["step"] <= start))
            self.file = open(path, "a" if start else "w")
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not self.rank0, dynamic_ncols=True)

    def log(self, row: dict, show: tuple[str, ...]):
        if self.rank0:
            data_prep.append_lines(self.file, [json.dumps(row) + "\n"])
            if self.tracker:
                self.tracker.log(row)
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in show if k in row and row[k] is not None})
        self.bar.update(1)
        stop_if_ctrl_c()  # the step is logged: a Ctrl-C that library code swallowed stops the run here

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tracker:
            self.tracker.close()


WARNED_ROWS: set[tuple] = set()  # (file, line number, text) logged_rows has warned about: once per process


def logged_rows(path: Path, warn: bool = True) -> list[dict]:
    """The step rows of a metrics.jsonl; a line that is not one (a write cut short by a kill) is dropped, with a
    warning, once per process (demo-report reads a log four times; warn=False: silently, for a caller that only asks
    whether the file is a run's log)."""
    rows, lines = [], path.read_bytes().decode("utf-8", "replace").splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif line.strip() and warn and (key := (str(path.absolute()), n, line)) not in WARNED_ROWS:
            WARNED_ROWS.add(key)  # a kill cuts only the last line short: one before it was edited or damaged
            cause = "cut short by a kill?" if n == last else "the file was edited or damaged"
            print(f"warning: {path} line {n} is not a complete step row ({cause}): dropped")
    return rows


def scalars(row: dict) -> dict:
    """The numbers of a metrics.jsonl row, what a tracker plots: bools as 0/1; text and None left out."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}


def open_tracker(cfg, out: Path, record: dict, start: int = 0):
    """--report-to: log(row) sends a metrics.jsonl row's scalars at its step to TensorBoard (<out>/tensorboard) or W&B
    (project $WANDB_PROJECT or 'ares', the run record as config; WANDB_MODE=offline: no network); close() ends it.
    None for 'none' and on every rank but 0. A run that starts (or resumes) at step `start` hides TensorBoard's
    events of the later steps (purge_step), as metrics.jsonl drops its rows: the steps run again are not shown twice."""
    if cfg.report_to == "none" or rank() != 0:
        return None
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1)

        def log(row):  # flushed each step, as metrics.jsonl is: a run that dies loses none of the steps it logged
            for k, v in scalars(row).items():
                writer.add_scalar(k, v, row["step"])
            writer.flush()
        return argparse.Namespace(close=writer.close, log=log)
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ares"), name=out.name, dir=str(out), config=record)
    return argparse.Namespace(close=run.finish, log=lambda row: run.log(scalars(row), step=row["step"]))


def update_stats(stats: dict, kl_sums: torch.Tensor, old, ro: Rollouts, keep: torch.Tensor) -> dict:
    """aepo_update's statistics over all ranks: clip fraction and KL per loss token, KL outside HWE windows (per
    response; per bucket it is the controller's input, which aepo_update adds) and inside them (per token), the largest
    gradient norm, and (old log-probs recomputed) the sampler's mean |log-prob - the trainer's| per response token of
    the kept rows."""
    gap = 0.0, 0.0
    if old is not None:  # sampler vs trainer log-prob agreement on the policy that sampled, rows that train
        lm = ro.resp_mask.float() * keep[:, None]  # (N, R)
        gap = ((old - ro.logprobs).abs() * lm).sum().item(), lm.sum().item()
    totals = all_reduce(torch.tensor([stats["clip_frac"], stats["tokens"], stats["kl"], *gap], dtype=torch.float64))
    stats.update(clip_frac=(totals[0] / totals[1].clamp(min=1)).item(), kl=(totals[2] / totals[1].clamp(min=1)).item(),
                 kl_inside_seen=kl_sums[3] > 0,
                 kl_inside=(kl_sums[2].sum() / kl_sums[3].sum().clamp(min=1)).item(),
                 kl_inside_by_bucket=kl_sums[2] / kl_sums[3].clamp(min=1),  # (3,) per token inside windows
                 kl_outside_mean=(kl_sums[0].sum() / kl_sums[1].sum().clamp(min=1)).item(),
                 grad_norm=largest_norm(stats["grad_norm"]))
    if old is not None:
        stats["logprob_gap"] = (totals[3] / totals[4].clamp(min=1)).item()  # per response token, all ranks
    return stats


def aepo_log_row(step: int, ro: dict, sc: dict, st: dict, upd: dict, times: tuple, lr: float) -> dict:
    """Global (all-rank) means of what a researcher watches, one JSON line per step. sc: score_groups(); times:
    seconds sampling (and grading), scoring, updating."""
    acc, lengths, n_he = sc.acc, sc.lengths, sc.n_he
    branch = ro.parent >= 0  # (N,)
    per_bucket = all_reduce(bucket_sums([torch.ones_like(acc), lengths, n_he, acc, branch.double()], sc.bucket))  # (5, 3)
    parent_acc = acc[ro.parent.clamp(min=0)]  # (N,) the accuracy of each branch's parent
    sums = all_reduce(torch.tensor([float(len(acc)), acc.sum(), sc.rewards.sum(), sc.format.sum(), lengths.sum(),
                                    n_he.sum(), (ro.entropy * ro.resp_mask).sum(), ro.loss_mask.sum(),
                                    branch.sum(), (acc * branch).sum(), (parent_acc * branch).sum(),
                                    ro.truncated.sum()], dtype=torch.float64)).tolist()
    n, branches = sums[0], max(sums[8], 1)
    row = dict(step=step + 1, reward=sums[2] / n, acc=sums[1] / n, format=sums[3] / n, len=sums[4] / n,
               n_he=sums[5] / n, entropy=sums[6] / max(sums[4], 1), truncated=sums[11] / n, tau=step_tau(ro),
               groups_kept=int(sc.groups[0]), groups=int(sc.groups[1]), prompts_drawn=int(sc.groups[1]),
               rollout_rounds=ro.rounds, branches=int(sums[8]),
               branch_acc=sums[9] / branches, parent_acc=sums[10] / branches, lr=lr, time_sample=times[0],
               time_score=times[1], time_update=times[2], rollout_tokens_per_s=sums[7] / max(times[0], 1e-9))
    for d, name in enumerate(BUCKETS):
        c = per_bucket[0, d].item()
        row.update({f"{key}_{name}": per_bucket[k, d].item() / c if c else None
                    for k, key in ((1, "len"), (2, "n_he"), (3, "acc"), (4, "branched"))})  # branched: share of rows
        row.update({f"{key}_{name}": upd[src][d].item() if src in upd and upd[seen][d] else None  # None: no such token
                    for key, src, seen in (("kl_outside", "kl_outside", "kl_seen"),
                                           ("kl_inside", "kl_inside_by_bucket", "kl_inside_seen"))})
        row.update({f"n_{name}": int(c), f"kappa_{name}": st["kappa"][d].item(),
                    f"target_{name}": None if math.isnan(st["targets"][d]) else st["targets"][d].item()})
    row.update({k: upd[k] for k in ("clip_frac", "kl", "kl_inside", "kl_outside_mean", "grad_norm", "logprob_gap",
                                    "skipped", "skipped_reason") if k in upd})
    return row


def level_stats(levels: list[str], recs: list[dict], sc: dict, G: int) -> dict:
    """When the records carry a `difficulty` label (the demo's levels, a benchmark's): per label, the mean length,
    N_HE and accuracy of its responses and how many of its groups fell in each online bucket (App. G), over
    all ranks. recs: the step's P records; sc: score_groups() of their P * G responses."""
    level = torch.tensor([levels.index(str(r["difficulty"])) for r in recs])  # (P,)
    acc = sc.acc
    sums = bucket_sums([torch.ones_like(acc), sc.lengths, sc.n_he, acc], level.repeat_interleave(G), len(levels))
    groups = torch.zeros(3, len(levels), dtype=torch.float64).index_put_(
        (sc.bucket[::G], level), torch.ones(len(level), dtype=torch.float64), accumulate=True)  # (3, levels)
    sums = all_reduce(torch.cat([sums, groups]))  # (4 + 3, levels)
    row = {}
    for j, name in enumerate(levels):
        n = sums[0, j].item()
        row.update({f"level_{name}_{key}": sums[k, j].item() / n if n else None
                    for k, key in ((1, "len"), (2, "n_he"), (3, "acc"))})
        row.update({f"level_{name}_groups_{b}": int(sums[4 + d, j]) for d, b in enumerate(BUCKETS)})
    return row


PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "4090": 165.0}  # dense bf16 by device name, the first match (H100: SXM)


def mfu(tokens_per_s: float, n_lm: int, n_lm_trained: int, device) -> float | None:
    """Model FLOPs utilisation of a cold-start step (GPU only): (4 N + 2 N_trained) FLOPs per token through the
    language model (forward 2 N, backward to the activations 2 N, weight gradients 2 N for the weights that train:
    6 N in full fine-tuning, about 4 N under LoRA) for every prompt and response token, over the card's dense bf16
    peak. The vision tower and attention's S^2 term are left out, so it is a lower bound (bench.py counts both)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return (4 * n_lm + 2 * n_lm_trained) * tokens_per_s / (peak * 1e12 * world_size()) if peak else None


@torch.no_grad()
def validate(cfg: Config, model, processor, ids: dict, records: list[dict]) -> dict:
    """--eval-data's held-out accuracy and mean response tokens, overall and per level, by eval.py's own metrics
    (data_prep.response_lines, data_prep.summarize), graded as training grades (--reward-fn or the grader, within
    --grader-timeout): greedy, --max-response-len new tokens, records dealt round-robin to ranks in calls of
    --rollout-batch; a prompt over --max-prompt-len counts as wrong. -> eval_acc, eval_len, eval_<level>_acc,
    eval_<level>_len."""
    usable, failed = data_prep.check_prompts(processor, records, cfg.max_prompt_len)
    mine, lines = usable[rank()::world_size()], []
    for k in range(0, len(mine), cfg.rollout_batch):
        chunk = mine[k:k + cfg.rollout_batch]
        out = sample(model, encode_prompts(processor, chunk), ids=ids, max_new_tokens=cfg.max_response_len,
                     temperature=0.0)
        lines += data_prep.response_lines(chunk, out, tokenizer_of(processor), 1, cfg.reward_fn, cfg.grader_timeout,
                                          cfg.grader_workers)
    by = data_prep.bucket_field(records, "auto")  # as eval.py's --bucket-by auto: difficulty, else level, else pass_rate
    level = {r["id"]: data_prep.bucket_of(r, by) for r in records}
    summary = data_prep.summarize([dict(x, bucket=level[x["id"]]) for x in gather(lines)],
                        [dict(f, bucket=level[f["id"]]) for f in failed])
    row = dict(eval_acc=summary["overall"]["accuracy"], eval_len=summary["overall"]["mean_tokens"])
    for name, m in summary["buckets"].items():
        row.update({f"eval_{name}_acc": m["accuracy"], f"eval_{name}_len": m["mean_tokens"]})
    return row



# ----------------------------------------------------------------------------------------------------------
# The run folder --out: one run at a time (a lock file), and a finished or interrupted run is never replaced
# or resumed by accident.


LOCK = "ares.lock"  # <out>/ares.lock: {"pid", "host", "since"} of the run holding the folder
HELD_LOCKS: list[Path] = []  # the locks this process holds, released when its run ends (run_command) or at exit
MADE_FOLDERS: list[Path] = []  # --out (and its parents) as take_lock created them, removed then while they are empty


def run_contents(out: Path) -> list[str]:
    """What a run left in `out`: its checkpoint folders and metrics.jsonl (a config.json alone: it never started)."""
    found = [f"{p.name}/" for p in checkpoint_folders(out, "", ".old", ".tmp")]
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        n = sum(1 for line in open(metrics, "rb") if line.strip())
        found.append(f"metrics.jsonl ({n} step{'s' * (n != 1)})")
    return found


def rank0_decides(fn, *args):
    """fn(*args) on rank 0 alone (the folder's checks and its lock, the run record); a SystemExit (or an error) there
    stops every rank (the others silently: rank 0 says why), so no rank waits in a collective for one that left.
    -> fn's result on rank 0, None on the others."""
    error = result = None
    if rank() == 0:
        try:
            result = fn(*args)
        except (SystemExit, Exception) as e:  # noqa: BLE001 - raised again below, on rank 0
            error = e
    if all_reduce(torch.tensor([float(error is not None)])).item():
        raise error or SystemExit(1)
    return result


def claim_out(cfg, contents=run_contents):
    """Before anything is read from or written to --out: take its lock, then stop on a run already there (`contents`)
    unless --resume continues it or --overwrite replaces it (clear_old_run deletes it, once every check has passed),
    on a config.json of the user's own (the run record would replace it) in a folder that holds no run, or beside one,
    and on a --resume whose history is gone. Rank 0 only (rank0_decides)."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise SystemExit("--resume continues the run in --out and --overwrite replaces it: give one of them")
    take_lock(out)
    there = contents(out)
    if there and not (cfg.resume or cfg.overwrite):
        how = ("add --overwrite to run it again there" if cfg.stage == "demo"  # the demo starts over (validate_config)
               else "add --resume to continue it, --overwrite to replace it")
        raise SystemExit(f"--out {cfg.out} holds a {'demo' if cfg.stage == 'demo' else 'run'} ({', '.join(there)}): "
                         f"{how}, or choose another --out")
    # (with a run there, --overwrite too: it deletes the checkpoints and writes the run record over that file; and
    # --resume, which writes it over a file of the user's: the run record cut or emptied is check_run_record's, damaged)
    if ((not there or cfg.overwrite or users_config(out)) and cfg.stage != "demo" and (out / "config.json").is_file()
            and model_folder_kind(out) != "run"):
        raise SystemExit(f"--out {cfg.out}: its config.json is not a run record of ares.py (no \"flags\" of a stage), and the run "
                         "would write its own over it: move the file, or choose another --out")
    ckpt = latest_checkpoint(out) if cfg.resume else None
    step = complete_record(ckpt)["step"] if ckpt else 0
    if step and not (out / "metrics.jsonl").is_file():
        raise SystemExit(f"--resume: {out / 'metrics.jsonl'} is missing, but {ckpt.name} is at step {step}: resuming "
                         "would lose the history of those steps. Put it back (an empty file resumes without it)")


def users_config(out: Path) -> bool:
    """Is <out>/config.json a JSON object of the user's (or another tool's): keys, but no "flags" of a stage? Not a
    run record cut short or emptied to {}."""
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((out / "config.json").read_bytes())
        return isinstance(config, dict) and bool(config) and not data_prep.is_run_record(config)
    return False


def clear_old_run(cfg, contents=run_contents):
    """--overwrite: delete the run in --out (its checkpoints, metrics.jsonl, --report-to's tensorboard/); --resume:
    delete the checkpoints a kill left half-written (<name>.tmp: save_checkpoint only clears the one it writes again,
    and a run resumed with other --steps or --save-every may never write that name). After claim_out took the lock
    and every check of the flags, the data and the run record has passed (check_run_record calls it). Rank 0 only."""
    out, there = Path(cfg.out), contents(Path(cfg.out))
    if cfg.overwrite and there:
        there += ["tensorboard/"] if (out / "tensorboard").is_dir() else []
        print(f"--overwrite: deleting the run in {out} ({', '.join(there)})", flush=True)
        for p in [*checkpoint_folders(out, "", ".old", ".tmp"), out / "metrics.jsonl", out / "tensorboard"]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for p in checkpoint_folders(out, ".tmp") if cfg.resume else []:
        print(f"--resume: deleting {p}, a checkpoint a stopped run left half-written", flush=True)
        shutil.rmtree(p)


def take_lock(out: Path):
    """Hold <out>/ares.lock for this process. The file is linked into place whole, so two runs never both hold it; a
    lock whose process is gone (same host) is stale and taken over with a warning; a live one stops this run."""
    made = [p for p in (out, *out.parents) if not p.exists()]  # the deepest first
    out.mkdir(parents=True, exist_ok=True)
    MADE_FOLDERS.extend(made)
    lock, mine = out / LOCK, out / f"{LOCK}.{os.getpid()}"
    mine.write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S"))))
    try:
        for _ in range(2):
            try:
                link_whole(mine, lock)
                HELD_LOCKS.append(lock)
                return
            except FileExistsError:
                holder = read_lock(lock)
            if lock_is_live(holder):
                raise SystemExit(f"--out {out} is in use by another run (pid {holder.get('pid')} on "
                                 f"{holder.get('host')}, since {holder.get('since')}): wait for it, choose another "
                                 f"--out, or delete {lock} if no such run exists")
            if holder.get("pid") != os.getpid():
                print(f"warning: taking over the stale lock {lock} of pid {holder.get('pid')} on {holder.get('host')} "
                      "(that process is gone)", flush=True)
            lock.unlink(missing_ok=True)
        raise SystemExit(f"--out {out}: another run took {lock} at the same moment: try again")
    finally:
        mine.unlink(missing_ok=True)


def link_whole(src: Path, dst: Path):
    """Create dst holding src's bytes, or raise FileExistsError: a hard link (atomic, never seen half-written), else,
    on a filesystem without hard links (some FUSE mounts), an exclusive create written at once."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, src.read_bytes())
        os.close(fd)


def read_lock(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}  # gone meanwhile, or not ours: stale


def lock_is_live(holder: dict) -> bool:
    """Is the lock's process still running? One on another host cannot be checked: it counts as live."""
    if holder.get("host") != socket.gethostname():
        return bool(holder)
    if holder.get("pid") == os.getpid():  # an earlier run in this very process (a notebook, a test) that ended
        return False
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        return True
    return True


@atexit.register
def release_locks():
    """Remove the locks this process holds (each only while it still names this process), then the folders take_lock
    created that hold nothing else: a run that a check stopped before it wrote anything leaves no empty --out behind.
    A folder that was there before, or that holds anything, stays."""
    for lock in HELD_LOCKS:
        if read_lock(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
    for folder in MADE_FOLDERS:
        with contextlib.suppress(OSError):  # not empty (or gone): kept
            folder.rmdir()
    HELD_LOCKS.clear()
    MADE_FOLDERS.clear()


def interrupted(cfg, how: str = "Ctrl-C", code: int = 130) -> str:
    """The line a Ctrl-C (or a SIGTERM: `how`, exit `code`) ends a training stage with: the step it stopped in and the
    checkpoint to resume from, or, for one during the final save, that the run is whole. A final/ of an earlier,
    shorter run that --resume extends is older than the last logged step, so it gets the first line."""
    out = Path(cfg.out)
    rows = logged_rows(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    where = f"interrupted ({how}) in step {rows[-1]['step'] + 1 if rows else 1} of {out}"
    if ckpt is None:
        if not rows:  # stopped before its first step: a config.json alone is a run that never started
            return f"interrupted ({how}) before the first step of {out}: nothing to resume; the same command starts it"
        return f"{where}: no checkpoint yet (one is saved every {cfg.save_every} steps); start again with --overwrite"
    step = complete_record(ckpt)["step"]
    if ckpt.name == "final" and rows and rows[-1]["step"] == step:  # held by ctrl_c_after until the final save was whole
        return f"{how} (exit {code}) as the run ended: its last step is logged and {ckpt} is complete; nothing to resume"
    return f"{where}: the newest checkpoint is {ckpt} (step {step}); continue from it with the same command and --resume"



# ----------------------------------------------------------------------------------------------------------
# The run record <out>/config.json, and the command line: flags, their checks, the stage defaults.


def run_record(cfg, read: dict | None = None, commits: dict | None = None) -> dict:
    """What <out>/config.json holds: every resolved flag, the package versions, the git commit of this folder (or None),
    the fingerprints of what the path flags name (`read`: --data's and --eval-data's records, which name image files,
    and a hub data set's, which are all there is of it: data_fingerprint; `commits`: the commit a hub --model or
    --ref-model is read at, "revision <sha>": model_commits)."""
    from importlib.metadata import distributions

    installed = {d.metadata["Name"].lower(): d.version for d in distributions()}
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    return dict(flags={k: v for k, v in dataclasses.asdict(cfg).items() if k != "given"}, cwd=os.getcwd(), git_commit=commit,
                versions={"python": sys.version.split()[0], **{p: installed.get(p) for p in (
                    "torch", "transformers", "datasets", "math-verify", "peft", "tensorboard", "wandb")}},
                contents=data_fingerprint({k: fingerprint(k, getattr(cfg, k)) for k in PATH_FLAGS}
                                          | {k: f"revision {sha}" for k, sha in (commits or {}).items()}, read or {}),
                world_size=world_size())


PATH_FLAGS = ("model", "ref_model", "data", "eval_data", "reward_fn")  # compared on --resume as the files they name


def same_flag(name: str, new, old, cwd_then: str) -> bool:
    """Is a flag's value on --resume the one the run started with? Paths are compared resolved (each against its
    run's working folder), so ./data.jsonl, data.jsonl and /abs/data.jsonl are the same file, and data.jsonl in
    another working folder is another file. Where the run's value is no path in its working folder (a hub model
    name, a module:function hook) or no longer one (a project moved with its files, a file deleted), there is nothing
    to compare with: the same text is taken as the same."""
    if name == "lora_targets" and isinstance(new, str) and isinstance(old, str):  # all-linear, or a set of layer names
        layers = lambda t: t if t == "all-linear" else sorted(set(lora_target_list(t)))  # noqa: E731
        return layers(new) == layers(old)
    if name not in PATH_FLAGS or not (isinstance(new, str) and isinstance(old, str) and new and old):
        return new == old
    if name == "reward_fn":  # file.py:function: the file resolved, the function by name
        (new, _, fn_new), (old, _, fn_old) = new.rpartition(":"), old.rpartition(":")
        if fn_new != fn_old:
            return False
    try:
        here, then = ((Path(cwd) / Path(p).expanduser()).resolve() for cwd, p in ((os.getcwd(), new), (cwd_then, old)))
    except RuntimeError:  # ~user/... of no such user: no path
        return new == old
    return here == then if then.exists() else new == old


MiB = 1 << 20
DATA_WHOLE = 1 << 30  # a data set up to this size is fingerprinted whole, past it sampled (fingerprint)


def digest(path: Path, sampled: bool = False) -> str:
    """sha256 of a file's bytes, streamed; sampled=True: of its size and ten 1 MiB pieces (the first, the last and 8
    evenly spaced between them) of a file over 16 MiB, the bytes of a smaller one."""
    h, size = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as f:
        if not sampled or size <= 16 * MiB:
            while chunk := f.read(MiB):
                h.update(chunk)
            return h.hexdigest()
        h.update(str(size).encode())
        for k in range(10):
            f.seek((size - MiB) * k // 9)
            h.update(f.read(MiB))
    return h.hexdigest()


def flag_path(name: str, value) -> Path | None:
    """The local file or folder a path flag names now (--reward-fn module:function: the module's source file), or
    None ('tiny', a hub model or data set, a preset, an installed module without a file)."""
    import importlib.util

    if name == "reward_fn" and isinstance(value, str):
        value = value.rpartition(":")[0]
        if value and not value.endswith(".py"):
            with contextlib.suppress(ImportError, ValueError):
                value = getattr(importlib.util.find_spec(value), "origin", None)
    if not isinstance(value, str) or value in ("", "tiny"):
        return None
    p = Path(value).expanduser()
    return p.resolve() if p.exists() else None


def fingerprint(name: str, value) -> str | None:
    """What a path flag's file or folder holds, recorded at a run's start and compared on --resume, so that a file
    edited in place (or a model retrained in place) under the same path does not slip into a run. None where nothing
    local is named (flag_path; compared by name). --data, --eval-data, --reward-fn's file: every byte (a data set is
    tens of MB, and start_stage reads it whole anyway), but a data set over DATA_WHOLE in all is sampled as a model is
    (a saved data folder with its images embedded can hold tens of GB, hashed at every start). --model,
    --ref-model: a checkpoint of ours by its COMPLETE record, which every save writes anew (its time, each file's size), so a retrain into that folder changes it; any
    other folder by each file's name and digest (but a tool_file's), a model's sampled past 16 MiB (config.json and
    the tokenizer whole; a weight file by its size and ten 1 MiB pieces: a retrain moves nearly every trained weight,
    so pieces of each trained shard change, while hashing GBs on each resume would not be cheap). Paths and file
    times are left out: a folder copied to another machine keeps its fingerprint."""
    p = flag_path(name, value)
    if p is None:
        return None
    if p.is_file():
        return digest(p, sampled=p.stat().st_size > DATA_WHOLE)
    model = name in ("model", "ref_model")
    if model and complete_record(p) is not None:
        return "COMPLETE " + digest(p / "COMPLETE")
    files = sorted(f for f in p.rglob("*") if f.is_file() and not tool_file(f.relative_to(p)))
    sampled = model or sum(f.stat().st_size for f in files) > DATA_WHOLE
    named = [(str(f.relative_to(p)), digest(f, sampled=sampled)) for f in files]  # the names too: a renamed shard
    return hashlib.sha256(json.dumps(named).encode()).hexdigest()


def data_fingerprint(contents: dict, read: dict) -> dict:
    """The path flags' fingerprints `contents`, with those of the data each of --data and --eval-data read (`read`:
    flag -> records): "<flag>_images", the image files its records name (image_fingerprint), and, for a hub data set
    (no local file: fingerprint None), "records " and the sha256 of its records (records_fingerprint), so that a new
    revision on the hub does not slip into a resume either."""
    for k, records in read.items():
        contents[f"{k}_images"] = image_fingerprint(image_files(records))
        if contents[k] is None and records:
            contents[k] = "records " + records_fingerprint(records)
    return contents


def model_commits(cfg) -> dict:
    """flag -> the commit that the hub model --model or --ref-model names (not a local folder, not `tiny`) is read at,
    every file of it (the tokenizer, the starting weights, the KL reference), so that a run reads one model and its
    resume the same one whatever the hub's main holds by then: on --resume the run record's ("revision <sha>" in
    `contents`), else (a new run, a record that predates revisions) the commit that main points to now (offline: in
    the cache). Its config.json is fetched at that commit, so a revision that cannot be had (offline and not in the
    cache) stops the run here with one line, before any weights load. Rank 0 (rank0_decides): it reads the record."""
    path, flags, contents, commits = Path(cfg.out) / "config.json", {}, {}, {}
    if cfg.resume:  # none, or damaged: check_run_record stops on it
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            saved = json.loads(path.read_text())
            flags, contents = dict(saved["flags"]), dict(saved.get("contents") or {})
    for k in ("model", "ref_model"):
        name, flag = getattr(cfg, k), "--" + k.replace("_", "-")
        if not name or name == "tiny" or flag_path(k, name) is not None:
            continue
        kept = contents.get(k) if flags.get(k) == name else None  # the flag changed: check_run_record stops on it
        revision = kept.removeprefix("revision ") if isinstance(kept, str) and kept.startswith("revision ") else None
        try:
            commits[k] = hub_commit(name, revision)
        except (OSError, ValueError) as e:
            if revision is None:  # rare: check_model_path has just read its config
                raise SystemExit(f"{flag} {name}: its config.json cannot be read from the hub or its cache "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
            raise SystemExit(f"--resume: {flag} {name}: the run started from its revision {revision} ({path} holds "
                             f"it), which is not in the hub cache and cannot be had from the hub ({type(e).__name__}: "
                             "offline, or the commit is gone): resume where the hub can be reached, or put that "
                             "revision into the cache (HF_HUB_CACHE)") from None
        if flags.get(k) == name and kept is None:
            print(f"--resume: {path} predates hub model revisions: {flag} {name} is read at the commit its name points "
                  f"to now, {commits[k]}, and at that one from now on", flush=True)
    return commits


def hub_commit(name: str, revision: str | None = None) -> str:
    """The commit a hub model's name (at `revision`, else main) points to: its config.json is fetched (offline: found
    in the cache), and the cache holds a commit's files in snapshots/<commit>/. OSError or ValueError where it cannot
    be had."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(name, "config.json", revision=revision)).parent.name


def records_fingerprint(records: list[dict]) -> str:
    """sha256 of records as read: each one's fields (JSON) and its images (encoded bytes as they are, a decoded PIL
    image by its mode, size and pixels; a file is image_fingerprint's, and its path, which may be absolute, is left
    out). A hub data set is read whole at every start anyway, so hashing what was read costs no download, and it
    changes with what the run reads alone: datasets' own fingerprint of a hub data set also changes with a revision
    that changed no row (a new README) and with the datasets version."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps({k: v for k, v in r.items() if k != "images"}, sort_keys=True, default=str).encode())
        for im in r["images"]:
            h.update(b"file" if isinstance(im, str) else im if isinstance(im, (bytes, bytearray))
                     else f"{im.mode} {im.size}".encode() + im.tobytes())
    return h.hexdigest()


def image_files(records: list[dict]) -> list[str]:
    """The image files records name, each once, in the data's order (an image given as bytes or a PIL image is in the
    data file's own bytes, which fingerprint covers)."""
    return list(dict.fromkeys(im for r in records for im in r["images"] if isinstance(im, str)))


IMAGE_DIGITS = 12  # hex digits of each image's sha256 in a run record: 470 kB for ViRL39K's 39K images


def image_fingerprint(files: list[str]) -> str | None:
    """What the image files a data set's records name hold, so that an image replaced under its name between a run and
    its resume does not mix two data sets: the first IMAGE_DIGITS hex digits of each file's digest, in the records'
    order (the data file's fingerprint fixes that order), so that changed_contents can name the file that changed.
    Sampled as a data folder is, past DATA_WHOLE in all. None where the records name no file. check_records has just
    read every file, so they come from the page cache: 2,000 PNGs of 150 kB hash in about 1 s on one core."""
    if not files:
        return None
    paths = [Path(f) for f in files]
    sampled = sum(p.stat().st_size for p in paths) > DATA_WHOLE
    return "".join(digest(p, sampled=sampled)[:IMAGE_DIGITS] for p in paths)


def tool_file(relative: Path) -> bool:
    """A file that tools write into a folder beside its contents, left out of its fingerprint: hidden ones (a
    --local-dir download's .cache/huggingface, with the time of each download; .git, whose index `git status`
    rewrites) and datasets' cache of a save_to_disk folder that was read (cache-*.arrow, and the tmp* file it is
    written through, seen while another process (eval.py, another run) reads the folder)."""
    name = relative.name
    return (any(part.startswith(".") for part in relative.parts) or name.startswith("cache-") and name.endswith(".arrow")
            or re.fullmatch(r"tmp[a-z0-9_]{8}", name) is not None)


def changed_contents(saved: dict, record: dict, read: dict | None = None) -> list[str]:
    """The path flags whose file or folder (or hub data set, or hub model's commit) holds other contents than the saved
    run record says, one entry each naming the flag and the file, then the data flags whose records' image files
    (`read`: flag -> records) do, naming the first that differs (a data file that changed says it all). A record
    written before fingerprints (no "contents") has none to compare, one written before those of images and hub data
    sets none of those."""
    old, new, flags = saved.get("contents") or {}, record["contents"], record["flags"]
    changed = [k for k in PATH_FLAGS if old.get(k) is not None and new.get(k) != old[k]]
    where = {k: flag_path(k, flags[k]) or (f"a hub model, {new[k]}" if k in ("model", "ref_model")  # "revision <sha>"
                                           else "a hub data set: its records") for k in changed}
    found = [f"--{k.replace('_', '-')} {flags[k]} ({where[k]})" for k in changed]
    for k, files in ((k, image_files(records)) for k, records in (read or {}).items()):
        then, now = old.get(f"{k}_images"), new.get(f"{k}_images") or ""
        if then is None or now == then or k in changed:
            continue
        at = next(i for i in range(0, max(len(now), len(then)), IMAGE_DIGITS)
                  if now[i:i + IMAGE_DIGITS] != then[i:i + IMAGE_DIGITS]) // IMAGE_DIGITS
        found.append(f"--{k.replace('_', '-')} {flags[k]}: its image " + (
            files[at] if at < len(files) else f"files are {len(files)}, not {len(then) // IMAGE_DIGITS}"))
    return found


def check_run_record(cfg, resumable: tuple[str, ...], ckpt: Path | None = None, last: int = 0,
                     read: dict | None = None, commits: dict | None = None) -> dict:
    """Write <out>/config.json and return it; with --resume, first stop on (and list) every changed flag but
    --resume, --out (the folder may have moved) and those in `resumable`, and on a file or model folder that a path
    flag still names but whose contents changed (fingerprint), or the data --data or --eval-data read (`read`: flag ->
    records; data_fingerprint); a damaged record stops it too. Then on a step
    checkpoint `ckpt` past the stage's `last` step (only --steps can move it once those pass; a final/: finished()).
    Every check passed, clear_old_run deletes what --overwrite replaces or a kill left half-written, so a resume that
    stops here leaves the folder as it was. Rank 0 only (rank0_decides): the fingerprints read every data file, once
    per run, not once per rank."""
    path, record = Path(cfg.out) / "config.json", run_record(cfg, read, commits)
    if cfg.resume and path.is_file():
        try:
            saved = json.loads(path.read_text())
            old, cwd_then = saved["flags"], saved.get("cwd", os.getcwd())
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--resume: the run record {path} is damaged ({type(e).__name__}: {e}), so the flags cannot "
                             "be checked against the run's: restore it, or delete it to resume without that check") from None
        diff = [f"--{k.replace('_', '-')} {record['flags'][k]!r} (was {v!r})" for k, v in old.items()
                if k in record["flags"] and k not in (*resumable, "resume", "overwrite", "out")
                and not same_flag(k, record["flags"][k], v, cwd_then)]
        if diff:
            raise SystemExit(f"--resume: flags differ from {path}: {'; '.join(diff)}. Only "
                             f"{', '.join('--' + k.replace('_', '-') for k in resumable)} may change on resume")
        for k in [k for k, records in (read or {}).items() if not records]:  # not read (--eval-data under --eval-every
            for key in (k, f"{k}_images"):  # 0): not compared, and the run's fingerprints kept for a resume that reads it
                if record["contents"][key] is None:
                    record["contents"][key] = (saved.get("contents") or {}).get(key)
        changed = changed_contents(saved, record, read)
        if changed:
            raise SystemExit(f"--resume: {'; '.join(changed)}: other contents than when the run started ({path} holds "
                             "their fingerprint): put the run's files back, or start a new run in another --out")
        if saved.get("world_size", record["world_size"]) != record["world_size"]:  # allowed: a job requeued on fewer nodes
            print(f"--resume: the run's last launch ran on {saved['world_size']} ranks and this one on "
                  f"{record['world_size']}: from here it samples other responses than it would have on "
                  f"{saved['world_size']} (README: Determinism)", flush=True)  # the record holds the last launch's ranks
        if "contents" not in saved:
            print(f"--resume: {path} predates content fingerprints: the files the flags name are checked by path only "
                  "this time, and by contents from now on", flush=True)
    if ckpt is not None and ckpt.name != "final" and (at := complete_record(ckpt)["step"]) > last:
        raise SystemExit(f"--resume: the newest checkpoint {ckpt} is at step {at}, past this run's last step {last} "
                         "(--steps): a run is shortened only to a step it has not passed: give more steps")
    clear_old_run(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_prep.write_atomically(path, json.dumps(record, indent=2, default=str))
    return record


MODEL_FLAGS = ("dtype", "attn", "min_pixels", "max_pixels")  # how a checkpoint is loaded and run


ModelConfig = dataclasses.make_dataclass(  # Config's loading flags alone: the first fields of eval.py's EvalConfig
    "ModelConfig", [(f.name, f.type, field(default=f.default, metadata=f.metadata))
                    for f in dataclasses.fields(Config) if f.name in MODEL_FLAGS])


def dataclass_parser(cls, description: str, staged_defaults=lambda f: [], given_only=False) -> argparse.ArgumentParser:
    """One --flag per field of a config dataclass, with its help string, type, choices and default (plus the
    stage-dependent defaults `staged_defaults(field)` names); list fields repeat (--model A --model B).
    given_only=True: no defaults, so the parsed namespace holds only the flags on the command line."""
    parser = data_prep.OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in (f for f in dataclasses.fields(cls) if "help" in f.metadata):  # fields without help are not flags
        flag = "--" + f.name.replace("_", "-")
        shown = ([str(f.default)] if f.default not in (None, "", dataclasses.MISSING) else []) + staged_defaults(f)
        help_text = f.metadata["help"].replace("%", "%%") + (f" (default: {'; '.join(shown)})" if shown else "")
        default = argparse.SUPPRESS if given_only else [] if f.type == "list" else f.default
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.type == "list":
            parser.add_argument(flag, action="append", default=default, metavar="STR", help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=default, metavar=kind.__name__.upper(), help=help_text,
                                choices=f.metadata.get("choices"))
    return parser


def parse_config(argv=None) -> Config:
    def staged(f):  # "coldstart 2e-05, aepo 1e-06" and "--model tiny: ..." beside the flags they set
        return [where + ", ".join(f"{s} {d[f.name]}" for s, d in layer.items() if f.name in d)
                for where, layer in (("", STAGE_DEFAULTS), ("--model tiny: ", TINY_DEFAULTS))
                if any(f.name in d for d in layer.values())]

    parser = dataclass_parser(Config, __doc__.split("\n")[0], staged)
    args = vars(parser.parse_args(argv))  # first: --help and bad flags are answered by the full parser
    data_prep.expand_home(args, ("out", "model", "ref_model", "data", "eval_data", "reward_fn"))  # --out=~/x
    given = vars(dataclass_parser(Config, "", given_only=True).parse_args(argv))  # only what the user typed
    cfg = Config(**args, given=tuple(sorted(given)))
    if cfg.stage != "demo" and not cfg.data:
        parser.error(f"--data is required for --stage {cfg.stage}")
    return validate_config(cfg)


HINTS = {"steps": " (leave --steps out to train for --epochs)", "temperature": " (AEPO samples at it; greedy "
         "decoding is eval.py's --temperature 0)", "keep_last": " (fewer would delete each checkpoint as it is written)"}


def validate_config(cfg: Config) -> Config:
    """Stop with one line naming the flag and its allowed values before anything loads. A stage default still
    None is checked after resolve_stage_defaults fills it (each stage calls this again)."""
    check_numbers(cfg)
    check_model_path("--model", cfg.model)
    check_model_path("--ref-model", cfg.ref_model, optional=True)
    for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        p = Path(path).expanduser()
        if path and (looks_local(path) or p.suffix in data_prep.RECORD_SUFFIXES) and not p.exists():
            raise SystemExit(f"{flag} {path}: no such file or folder")
    data_prep.check_split_flags(cfg.data, split=cfg.split if "split" in cfg.given else None)
    if cfg.eval_data and cfg.eval_every != 0:  # a preset without a held-out split: now, not after --data is read whole
        try:
            data_prep.held_out_split(cfg.eval_data)
        except DataError as e:  # as start_stage's line would say it
            raise SystemExit(f"data error: --eval-data: {e}") from None
    if cfg.stage == "demo" and cfg.resume:
        raise SystemExit("--resume: the demo does not continue a stopped demo; run it again with --overwrite (it "
                         "starts over), or give another --out")
    if cfg.stage == "demo":
        check_demo(cfg)
    data_prep.check_writable("--out", cfg.out)  # not empty (it would be the working folder), under a folder, writable
    out = Path(cfg.out).expanduser()
    saved = out if out.exists() and model_folder_kind(out) in ("model", "adapter") else checkpoint_holding(out)
    if saved is not None:  # --out a saved model, or a folder inside a checkpoint (which keep_last may delete)
        raise SystemExit(f"--out {cfg.out}: " + ("it is" if saved == out else f"{saved} is") + " a saved model, not a "
                         "run folder (a run there would overwrite its files); give a new folder")
    if (name := run_name_holding(out.absolute())) is not None:  # as eval.py and data_prep.py refuse theirs
        raise SystemExit(f"--out {cfg.out}: {name} is a name the training run in {name.parent} writes there itself "
                         f"({name.name}), which its save, --keep-last or --overwrite replaces: give another folder")
    for flag, path in (("--model", cfg.model), ("--ref-model", cfg.ref_model)):
        if path and Path(path).expanduser().exists() and out.resolve() in Path(path).expanduser().resolve().parents:
            raise SystemExit(f"{flag} {path} lies inside --out {cfg.out}, where this run saves its checkpoints and "
                             "deletes old ones (--keep-last, --overwrite): it would lose the model it starts from; "
                             "copy it out of --out, or give another --out")
    return validate_extras(cfg)


def check_numbers(cfg, hints: dict = HINTS):
    """Every number of a config dataclass (Config, eval.py's EvalConfig) finite and inside its field's `allowed`."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):  # numbers only (not None, text, `given`)
            continue
        allowed, test = f.metadata.get("allowed") or ("finite", lambda v: True)
        if f.name == "max_pixels":
            test = lambda v: v >= cfg.min_pixels  # noqa: E731
        if not (math.isfinite(v) and test(v)):
            finite = "" if math.isfinite(v) or allowed == "finite" else " and finite"
            raise SystemExit(f"--{f.name.replace('_', '-')} must be {allowed}{finite}, got {v}{hints.get(f.name, '')}")
        if isinstance(v, int) and abs(v) > INT_LIMIT and f.name != "seed":  # past it: OverflowError deep in torch or C
            raise SystemExit(f"--{f.name.replace('_', '-')} must be at most {INT_LIMIT}, got {v}")


def checkpoint_holding(path) -> Path | None:
    """The checkpoint of a training run that `path` is, or lies inside (a folder with a COMPLETE record), else None:
    an output written there would go with the checkpoint when a later save, --keep-last or --overwrite replaces it."""
    p = Path(path).expanduser().absolute()
    return next((q for q in (p, *p.parents) if (q / "COMPLETE").is_file()), None)


RUN_NAMES = r"config\.json|metrics\.jsonl|ares\.lock(\.\d+)?|tensorboard|(final|step_\d+)(\.tmp|\.old)?"  # a run's own


def check_clear_of_run(flag: str, path, folder: bool = True):
    """`path` (an output folder, or with folder=False a file) neither is nor lies inside one of ares.py's checkpoints (a
    folder with a COMPLETE record: the run's next save of that name, --keep-last or --overwrite replaces it whole, with
    the output), is not itself a run folder (its config.json a run record: the output's files would be mixed with the
    run's), and does not take a name the run writes in its folder (RUN_NAMES: metrics.jsonl, final/, step_<n>/, ...).
    A subfolder of a run (runs/x/eval) or another file beside its files (runs/x/acc.png) is not the run's: no save,
    --keep-last or --overwrite touches it. One line naming the flag and the folder otherwise. eval.py's outputs; ares.py
    refuses the same for its --out (validate_config); data_prep.py's data outputs stay outside runs altogether
    (data_prep.check_outside_runs)."""
    p = Path(path).expanduser().absolute()
    if (q := checkpoint_holding(p)) is not None:
        raise SystemExit(f"{flag} {path}: " + ("it is" if q == p else f"{q} is") + " a checkpoint of a training "
                         "run, which its next save, --keep-last or --overwrite replaces whole: give a folder outside it")
    if folder and data_prep.run_record_in(p):
        raise SystemExit(f"{flag} {path}: it is the folder of a training run (its config.json is ares.py's run record), "
                         "whose files are the run's: give a subfolder of it, or a folder outside it")
    if (q := run_name_holding(p)) == p:
        raise SystemExit(f"{flag} {path}: {p.parent} is the folder of a training run, which writes its own {p.name} "
                         "there: give another name")
    if q is not None:  # inside runs/x/tensorboard/ (--overwrite deletes it) or a final/ not yet saved (the save replaces it)
        raise SystemExit(f"{flag} {path}: {q} is the training run's own {q.name} (its folder {q.parent}), which the "
                         "run's save, --keep-last or --overwrite replaces whole: give a folder outside it")


def run_name_holding(path: Path) -> Path | None:
    """The name a training run writes in its folder (RUN_NAMES) that `path` is or lies inside, else None."""
    return next((q for q in (path, *path.parents)
                 if re.fullmatch(RUN_NAMES, q.name) and data_prep.run_record_in(q.parent)), None)


def model_folder_kind(p: Path) -> str | None:
    """What a folder holds: 'adapter' (a LoRA adapter alone), 'run' (a run folder: its config.json is the run record,
    data_prep.run_record_in), 'model' (one of our checkpoints: COMPLETE, or a config.json with a model_type), or None
    (none of these: another tool's config.json is not taken for a run or a model)."""
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        return "adapter"
    if (p / "COMPLETE").is_file():
        return "model"
    try:
        config = json.loads((p / "config.json").read_bytes())
    except (OSError, ValueError):  # none, or cut (a run record damaged to {} says so on --resume)
        return None
    if data_prep.is_run_record(config):  # its "flags" ares.py's (another tool's config.json may have "flags" too)
        return "run"
    return "model" if isinstance(config, dict) and "model_type" in config else None


def check_model_path(flag: str, path: str | None, optional: bool = False):
    """A --model (--ref-model) that names a local folder must hold a model: one line naming the flag otherwise (a run
    folder or a LoRA adapter says which folder to give instead). Hub names pass (they load later)."""
    p = Path(path or "").expanduser()
    if not optional and path is not None and not path.strip():  # --ref-model "" is the default: the starting model
        raise SystemExit(f"{flag} is empty: give a checkpoint folder or a hub name like Org/Model")
    if not path or path == "tiny":
        return
    if not (looks_local(path) or p.exists()):  # a hub name (runs/x looks like one): its config must load, now
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{flag} {path}: no such folder, and no model of that name on the hub (or in its cache, "
                             f"offline): {str(e).splitlines()[0][:160]}") from None
        return
    kind = model_folder_kind(p) if p.is_dir() else None
    if kind == "model":
        return
    if kind == "run":
        raise SystemExit(f"{flag} {path}: a run folder, not a checkpoint: give {p / 'final'} (or one of its step_* folders)")
    if kind == "adapter":
        raise SystemExit(f"{flag} {path}: a LoRA adapter alone: give the checkpoint that holds it, {p.parent} (its "
                         "merged model)")
    why = "no such folder" if not p.exists() else "not a model folder (" + (
        "its config.json is not a model's: no model_type" if (p / "config.json").is_file() else "it has no config.json") + ")"
    raise SystemExit(f"{flag} {path}: {why}; give a saved checkpoint folder or a hub name like Org/Model")


def check_attn(attn: str):
    """--attn flash_attention_2 without its package: one line now, not an ImportError when the model loads."""
    import importlib.util

    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise SystemExit("--attn flash_attention_2 needs the optional package flash-attn: pip install flash-attn "
                         "(or use --attn sdpa)")


def validate_extras(cfg: Config) -> Config:
    """The flags that name code, a preset or an optional package: each problem in one line before anything loads."""
    import importlib.util

    if cfg.reward_fn:
        data_prep.load_reward_fn(cfg.reward_fn)
    if cfg.preset and cfg.preset not in data_prep.PRESETS:
        raise SystemExit(f"--preset {cfg.preset}: unknown; presets: {', '.join(data_prep.PRESETS)}")
    tracker_package = cfg.report_to in ("tensorboard", "wandb")  # a tracker a fork adds may need none (README: forking)
    for flag, package, asked in (("--report-to " + cfg.report_to, cfg.report_to, tracker_package),
                                 ("--lora-rank", "peft", cfg.lora_rank)):
        if asked and importlib.util.find_spec(package) is None:
            raise SystemExit(f"{flag} needs the optional package {package}: pip install {package}")
    if cfg.lora_rank and cfg.fsdp:
        raise SystemExit("--lora-rank does not work with --fsdp (LoRA runs with DDP: the frozen base is small enough)")
    for flag, given in (("--lora-alpha", cfg.lora_alpha is not None), ("--lora-targets", cfg.lora_targets != "all-linear")):
        if given and not cfg.lora_rank:
            raise SystemExit(f"{flag} needs --lora-rank R (LoRA is off without it, so {flag} would do nothing)")
    check_lora_targets(cfg)
    if cfg.ref_model and cfg.kl_coef == 0:
        raise SystemExit(f"--ref-model {cfg.ref_model} needs --kl-coef > 0 (the reference is only read by the KL term, "
                         "which --kl-coef 0 turns off)")
    if cfg.eval_every and not cfg.eval_data:
        raise SystemExit("--eval-every needs --eval-data (the held-out records to validate on)")
    if cfg.group_filter == "reward" and (cfg.format_weight or cfg.keep_uniform_groups):
        raise SystemExit("--group-filter reward needs --format-weight 0 (its [0.01, 0.99] is for rewards near [0, 1]) and "
                         "no --keep-uniform-groups (which keeps every group)")
    if cfg.dtype == "fp16":
        raise SystemExit("--dtype fp16: training in fp16 needs loss scaling, which ares.py does not do (small gradients "
                         "would round to zero without an error); use bf16 (on Ampere or newer GPUs) or fp32")
    token = data_prep.CHAT_TOKEN.search(cfg.prompt_suffix or "")
    if token:  # as in a record's text: the model would read '<|im_end|>' as the end of its turn
        raise SystemExit(f"--prompt-suffix contains the chat-template token {token.group()!r}: remove it or spell it "
                         "differently")
    check_attn(cfg.attn)
    if cfg.rollout_batch != "auto" and not (str(cfg.rollout_batch).isdigit() and int(cfg.rollout_batch) >= 1):
        raise SystemExit(f"--rollout-batch must be auto or an integer >= 1, got {cfg.rollout_batch}")
    return cfg


RESUMABLE = ("steps", "save_every", "keep_last", "log_samples_every", "report_to", "dist_timeout", "grader_workers",
             "eval_every", "deterministic")  # the flags that may change on --resume: none changes what a step computes


def looks_local(name: str) -> bool:
    """A path, not a hub name (Org/Name): absolute, ./ ../ or ~, or more than one '/'."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def resolve_stage_defaults(cfg: Config, stage: str) -> Config:
    """Fill the stage-dependent knobs: a flag the user gave (or a value a caller set) wins, even one equal to the
    dataclass default; then the tiny model's CPU-sized defaults, then the stage's paper defaults."""
    cfg = dataclasses.replace(cfg, stage=stage)
    for name in cfg.given:
        owner = next((s for s, names in STAGE_FLAGS.items() if name in names), stage)
        if owner != stage:
            raise SystemExit(f"--{name.replace('_', '-')}: only --stage {owner} reads it; with --stage {stage} it would "
                             "do nothing: leave it out")
    changed = set(cfg.given) | {f.name for f in dataclasses.fields(Config) if getattr(cfg, f.name) != f.default}
    if stage == "coldstart" and "epochs" in changed:  # --epochs sets the length: no default --steps may override it
        changed.add("steps")
    for layer in ([TINY_DEFAULTS[stage]] if is_tiny(cfg.model) else []) + [STAGE_DEFAULTS[stage]]:
        for k, v in layer.items():
            if k not in changed:
                setattr(cfg, k, v)
                changed.add(k)
    if cfg.branch_samples is None:
        cfg.branch_samples = cfg.group_size // 2
    if not 0 <= cfg.branch_samples < cfg.group_size:
        raise SystemExit(f"--branch-samples must be in [0, group size {cfg.group_size}), got {cfg.branch_samples}")
    if cfg.eval_every is None:  # --eval-data alone validates at every checkpoint (README: validation)
        cfg.eval_every = cfg.save_every if cfg.eval_data else 0
    if cfg.prompt_suffix is None:  # resolved here, so that the run record holds it
        cfg.prompt_suffix = model_prompt_suffix(cfg.model)
    return cfg



# ----------------------------------------------------------------------------------------------------------
# The demo (`python ares.py`): all of ARES offline on a CPU, every stage as the command a user runs on
# real data (data_prep.py's demo task and adacs, both stages of this file, eval.py's passrate and evaluation),
# then eval.py's report.


DEMO = dict(sft=16000, pool=1200, rl=1000, test=300)  # problems per split (the warm-up sees each about twice)


DEMO_STEPS = dict(warmup=800, coldstart=300, aepo=100)  # optimizer steps of the warm-up, cold start and AEPO


DEMO_AEPO = ["--keep-uniform-groups", "--trigger-words"]  # both runs: all-right groups carry ARES's length signal;
# HWE windows start at a reasoning word (the paper's appendix), so N_HE counts re-checks, not uncertain digits


BASELINE = ["--entropy-shaping", "none", "--branch-samples", "0", "--kl-mode", "fixed", "--clip-high", "0.2",
            "--dual-clip", "0"]  # plain GRPO: R = acc, no branching, one fixed beta, symmetric clip 0.2, no dual clip


DEMO_SETS = ("model", "data", "preset", "split", "steps", "epochs")  # the demo's own: given to it, one line (check_demo)


def demo_given(cfg: Config, stage: str) -> list[str]:
    """The flags the user gave to the demo that `stage` reads (STAGE_FLAGS), other than those the demo sets itself."""
    other = {name for s, names in STAGE_FLAGS.items() if s != stage for name in names}
    return [name for name in cfg.given if name not in {"stage", "out", "resume", "seed", *DEMO_SETS, *other}]


def check_demo(cfg: Config):
    """Before the demo writes anything: a flag it sets itself stops it, and the flags it passes on to each stage's
    commands must make a valid run of that stage (else the demo would stop after minutes, at that stage)."""
    mine = [name for name in DEMO_SETS if name in cfg.given]
    if mine:
        raise SystemExit(f"--{mine[0].replace('_', '-')}: the demo sets it itself (its tiny model, its task, its steps; "
                         "--demo-steps N shortens it): for your own, run --stage coldstart or --stage aepo")
    for stage in ("coldstart", "aepo"):
        check_numbers(resolve_stage_defaults(dataclasses.replace(cfg, model="tiny", given=tuple(demo_given(cfg, stage))),
                                             stage))


def demo_flags(cfg: Config, stage: str) -> list[str]:
    """The flags the user gave to `ares.py` that `stage` reads, passed on to each of its training commands."""
    flags, kind = [], {f.name: f.type for f in dataclasses.fields(Config)}
    for name in demo_given(cfg, stage):
        value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if kind[name] == "bool" else [flag, str(value)]
    return flags


def demo_command(args: list, procs: list, log: Path, nproc: int = 1):
    """Start `python <args>` (`torchrun --nproc_per_node <nproc>` for nproc > 1), one thread per process, output to
    `log`, and print it: the demo is a script of the commands a user runs."""
    args = [str(a) for a in args]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    rank0_print(f"$ {f'torchrun --nproc_per_node={nproc}' if nproc > 1 else 'python'} " + shlex.join(args))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    script = str(Path(__file__).with_name(args[0]))  # beside ares.py, wherever it is run from
    with open(log, "w") as fh:
        procs.append((subprocess.Popen([sys.executable, *launch, script, *args[1:]], stdout=fh, stderr=subprocess.STDOUT,
                                       env=env), log))


def demo_wait(procs: list):
    """Wait for a stage's processes. The first that fails ends the demo with its output, and so does a Ctrl-C; either
    way the others are stopped first, with a SIGTERM, which a stage takes as a Ctrl-C (it releases its --out and says
    where it stopped) even where Ctrl-C is ignored (`python ares.py &`, nohup), so that no stage goes on writing into
    the demo's folder, or holds its lock, after the demo has ended."""
    try:
        while procs:
            for proc, log in list(procs):
                if proc.poll() is None:
                    continue
                procs.remove((proc, log))
                if proc.returncode:
                    raise SystemExit(f"demo stage failed ({proc.returncode}); its output:\n" + log.read_text()[-3000:])
            time.sleep(0.2)
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # it did not stop at its SIGTERM
                proc.kill()
                proc.wait()
        procs.clear()


def run_demo(cfg: Config):
    """ARES end to end on the demo task (AdaCS, paper §3.1, then AEPO, Alg. 1), with plain GRPO from the same cold
    start beside it, as the list of commands a user runs on real data, each printed as it starts:
      1. data_prep.py demo      bars whose lengths are numbers: read one, add two, multiply two sums; per problem
                                three teacher traces: terse, steps (the arithmetic in one line), steps + a
                                re-check that works it out (the teacher slips: it misreads some short bars unless
                                it re-checks, most of its bare answers are one off, and some of its hard lines are
                                off, which its re-check catches)
      2. ares.py coldstart      warm-up: the random tiny model learns to read and reason on one trace per problem:
                                the demo's base model (the paper starts from an Instruct VLM) and the reference
                                policy of the pass rates
      3. eval.py passrate       K = 8 samples per pool problem from the base model: p(x)
      4. data_prep.py adacs     per problem the teacher trace nearest L_target(p), equal counts per bracket
      5. ares.py coldstart      the cold start: the base model on the curated traces
      6. ares.py aepo, twice    ARES and GRPO from the same cold start, seed, KL and steps, side by side (a core each;
                                DEMO_AEPO for both, BASELINE for GRPO)
      7. eval.py, twice         all three checkpoints on the held-out split, greedy and at T = 1, per level
      8. eval.py demo-report    <out>/demo.json, curves.png (ARES and GRPO over the AEPO steps), explore.html
    Stages 2, 3 and 5 run under torchrun as two CPU processes (DDP over gloo): the CPU's two cores as two ranks."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SystemExit("run the demo with `python ares.py`: it starts torchrun itself where a stage uses two ranks")
    out, times, procs = Path(cfg.out), {}, []
    demo_contents = lambda out: [f"{s}/" for s in ("warmup", "coldstart", "aepo", "grpo") if run_contents(out / s)]  # noqa: E731
    claim_out(cfg, demo_contents)
    clear_old_run(cfg, demo_contents)
    for cache in ("eval_greedy", "eval_sampled"):  # eval.py's caches are keyed by the checkpoints' paths
        shutil.rmtree(out / cache, ignore_errors=True)
    small = bool(cfg.demo_steps)  # --demo-steps N: a quick look, on a smaller task too
    steps = {k: (cfg.demo_steps * (5 if k != "aepo" else 1) if small else v) for k, v in DEMO_STEPS.items()}
    sizes = dict(sft=120, pool=150, rl=64, test=30) if small else DEMO
    data, seed = out / "data", ["--seed", cfg.seed]
    tick = time.time()

    def run(name, *commands):  # start each command (args, log name[, ranks]) side by side, wait, time the stage
        nonlocal tick
        for args, log, *nproc in commands:
            demo_command(args, procs, out / f"{log}.log", *nproc)
        demo_wait(procs)
        times[name] = time.time() - tick
        rank0_print(f"[demo] {name}: {times[name]:.0f}s")
        tick = time.time()

    out.mkdir(parents=True, exist_ok=True)
    # out/data is the demo's own (claim_out has decided on --overwrite): its stages replace what a stopped demo left
    run("data", (["data_prep.py", "demo", "--out", data, "--overwrite", *seed,
                  *(x for k, n in sizes.items() for x in (f"--{k}", n))], "data"))
    train = ["ares.py", "--stage", "coldstart", *seed, *demo_flags(cfg, "coldstart")]
    run("warm-up", ([*train, "--model", "tiny", "--data", data / "sft.jsonl", "--out", out / "warmup", "--steps",
                     steps["warmup"]], "warmup", 2))
    run("pass rates", (["eval.py", "passrate", "--data", data / "pool.jsonl", "--model", out / "warmup" / "final",
                        "--k", 8, "--max-new-tokens", 128, "--batch-size", 16, *seed, "--out", data / "pass_rates.jsonl",
                        "--overwrite"],
                       "passrate", 2))
    per_bracket = sizes["pool"] // (1 if small else 9)  # about a ninth of the pool per pass-rate bracket
    run("adacs", (["data_prep.py", "adacs", "--data", data / "pool_traces.jsonl", "--pass-rates",
                   data / "pass_rates.jsonl", "--model", "tiny", "--per-bracket", per_bracket, *seed, "--out",
                   data / "adacs.jsonl", "--overwrite"], "adacs"))
    run("coldstart", ([*train, "--model", out / "warmup" / "final", "--data", data / "adacs.jsonl", "--out",
                       out / "coldstart", "--steps", steps["coldstart"]], "coldstart", 2))
    cold = out / "coldstart" / "final"
    aepo = ["ares.py", "--stage", "aepo", "--model", cold, "--data", data / "rl.jsonl", "--steps", steps["aepo"], *seed,
            *DEMO_AEPO, *demo_flags(cfg, "aepo")]
    run("aepo", ([*aepo, "--out", out / "aepo"], "aepo"), ([*aepo, *BASELINE, "--out", out / "grpo"], "grpo"))
    models = ["--model", cold, "--model", out / "aepo" / "final", "--model", out / "grpo" / "final", "--name",
              "cold start", "--name", "ARES", "--name", "GRPO", "--data", data / "test.jsonl", "--max-new-tokens", 128]
    run("eval", (["eval.py", *models, "--out", out / "eval_greedy"], "eval_greedy"),
        (["eval.py", *models, "--temperature", 1.0, "--samples", 4, "--out", out / "eval_sampled"], "eval_sampled"))
    data_prep.write_atomically(out / "stage_times.json", json.dumps(times))
    run("report", (["eval.py", "demo-report", out], "report"))
    print((out / "report.log").read_text())


# ----------------------------------------------------------------------------------------------------------
# Entry point.


NEEDS = {"transformers": "5.24.0", "torch": "2.6"}  # transformers: the cache API; torch: FSDP2's fully_shard


def check_versions():
    """One line and stop when an installed package is older than this file needs (README: dependencies)."""
    from importlib.metadata import version

    from packaging.version import Version

    for package, need in NEEDS.items():
        if Version(version(package)) < Version(need):
            raise SystemExit(f"ares.py needs {package} >= {need}, found {version(package)}: pip install '{package}>={need}'")


def run_command(fn, *args):
    """Run a command-line entry point (this file's, eval.py's): bad data ends it with one clear line instead of a
    traceback, and the process group is always closed."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_versions()
    broken = False  # a collective failed: its gloo work may wait on forever, and destroying the group would join it
    try:
        return fn(*args)
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    except OSError as e:
        line = data_prep.disk_failure(e, "--resume continues a training run, the same command an evaluation")
        if line is None:
            raise
        raise SystemExit(line) from None
    except RuntimeError as e:  # gloo's error in any collective (DDP's backward, FSDP's gathers, ours): one line
        line = collective_failure(e, getattr(args[0], "dist_timeout", None) if args else None)
        if line is None:
            raise
        broken = True
        raise SystemExit(line) from None
    finally:
        release_locks()
        if dist.is_initialized() and not broken:  # a broken group is left to the exit of the process
            dist.destroy_process_group()


COLLECTIVE_ERRORS = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")  # gloo's words


def collective_failure(e: RuntimeError, timeout_s) -> str | None:
    """The line for a collective that failed because another rank stalled past --dist-timeout or left (died, or
    stopped with its own line), else None. Under NCCL, its watchdog ends a stalled job with a message of its own."""
    text = str(e)
    if not dist.is_initialized() or not any(w in text for w in COLLECTIVE_ERRORS):
        return None
    limit = f"--dist-timeout {timeout_s} s" if timeout_s else "its time limit (30 min)"  # eval.py: the default
    how = (f"waited more than {limit} for another rank, which died or stalls" if "Timed out" in text
           else "lost another rank, which died or stopped (its own line says why)")
    return (f"rank {dist.get_rank()}: a collective {how}: the run stopped, and the checkpoints before this step are "
            f"whole; continue with --resume ({gloo_cause(e)})")


def gloo_cause(e: RuntimeError) -> str:
    """A collective's error in a few words: its first sentence, without gloo's source location."""
    return re.sub(r"^\[[^]]*\] *", "", str(e).splitlines()[0]).split(". ")[0]


@contextlib.contextmanager
def ctrl_c_handled():
    """on_ctrl_c for the command, for SIGINT where Python's own handler is in place (not where Ctrl-C is ignored, as
    under nohup) and for SIGTERM where it would kill the process outright; on the main thread only. The previous
    handlers afterwards."""
    CTRL_C.update(seen=False, held=0, signal=signal.SIGINT)
    main_thread = threading.current_thread() is threading.main_thread()
    ours = {sig: previous for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
            if main_thread and (previous := signal.getsignal(sig)) is default}
    for sig in ours:
        signal.signal(sig, on_ctrl_c)
    try:
        yield
    finally:
        for sig, previous in ours.items():
            signal.signal(sig, previous)
        CTRL_C.update(seen=False, held=0)  # the signal stays: main's line names it


def close_progress_bars():
    """End any open progress bar on its own line first, so that it is not drawn again after the line that stops the
    run (tqdm redraws a bar it has not closed when the process exits)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    with one_line_per_node():
        cfg = parse_config(argv)
    try:
        with ctrl_c_handled(), one_line_per_node():
            run_command({"demo": run_demo, "coldstart": train_coldstart, "aepo": train_aepo}[cfg.stage], cfg)
    except SystemExit as e:
        if isinstance(e.code, str):  # a line that stops the run mid-stage (a checkpoint that cannot be written)
            close_progress_bars()
        raise
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: where it stopped and how to go on, not a traceback
        close_progress_bars()
        how, code = ("SIGTERM", 143) if CTRL_C["signal"] == signal.SIGTERM else ("Ctrl-C", 130)  # the shells' codes
        if int(os.environ.get("RANK", 0)) == 0:  # the process group is closed by now
            print("\n" + (interrupted(cfg, how, code) if cfg.stage != "demo" else f"interrupted ({how}): the demo in "
                          f"{cfg.out} stopped; run it again with --overwrite"), file=sys.stderr, flush=True)
        raise SystemExit(code) from None


if __name__ == "__main__":
    if EARLY_CTRL_C:  # imported: Python's own handler again, which main's ctrl_c_handled replaces with on_ctrl_c
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    finally:  # the run is over, whole: a Ctrl-C while Python shuts down would end it with exit -2 and no word
        signal.signal(signal.SIGINT, signal.SIG_IGN)
