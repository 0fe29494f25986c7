"""Issue 4, the AEPO stage: the sampler (log-probs, entropies, top-p, EOS), HWE-triggered branching rollouts, the
direction of the update, the loop end to end in one process and under torchrun (DDP and FSDP2), exact resume, and
degenerate batches.

References are independent of the code under test: a plain `model(...)` forward over the whole sequence (the model
derives its own 3-D rotary positions from `mm_token_type_ids`), numpy's nucleus distribution, plain Python loops
for window entropies, tau and branch-point selection, and a second (uninterrupted, or other-rank) run.
"""
import copy
import dataclasses
import itertools
import json
import random
import re
import shutil
import statistics
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, LayerRecomputes, run_script, run_until_first_step_save
from safetensors.torch import load_file

import ares
import data_prep

T_SAMPLE, TOP_P = 0.8, 0.95


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def placeholder_ids(model) -> list[int]:
    """The policy never emits an image/video placeholder: they are outside its distribution (ares.banned_tokens)."""
    return [model.config.image_token_id, model.config.video_token_id]


def encoded_prompts(processor, demo_file, picks) -> list[dict]:
    records = data_prep.load_records(str(demo_file))
    out = []
    for k in picks:
        record = records[k] if isinstance(k, int) else dict(records[0], id="text-only", images=[], question=k)
        out.append(data_prep.encode_prompt(processor, record))
    return out


@torch.no_grad()
def teacher_forced(model, prompt: dict, tokens: torch.Tensor, start: int, temperature: float):
    """log p and entropy of tokens[start:] given prompt + tokens[:start], from ONE plain forward over the unpadded
    sequence: logits / T over the vocabulary without the placeholders, log_softmax, gather. -> (n,), (n,)."""
    seq = torch.cat([prompt["ids"], tokens])[None]  # (1, P + n)
    kw = dict(input_ids=seq, attention_mask=torch.ones_like(seq),
              mm_token_type_ids=(seq == model.config.image_token_id).int())
    if prompt["pixel_values"] is not None:
        kw.update(pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])
    P = len(prompt["ids"])
    logits = model(**kw).logits[0, P + start - 1:-1].float()  # position P + k - 1 predicts token k
    logits[:, placeholder_ids(model)] = -float("inf")
    logp = torch.log_softmax(logits / temperature, -1)
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    return logp.gather(1, tokens[start:, None])[:, 0], entropy


def special_ids_with_extra_stops(model, processor, extra=range(100, 160)) -> dict:
    """The tiny random model almost never says <|im_end|>: widen the stop set so that rows end at ragged lengths."""
    ids = dict(ares.special_ids(model, processor))
    ids["stop"] = sorted(set(ids["stop"]) | set(extra))
    return ids


def check_rows_end_properly(out: dict, stop: list[int], pad: int, budgets: list[int]):
    """Each row: a contiguous mask from position 0; a stop token ends it (nothing after it but padding with
    log-prob and entropy 0); a row without a stop token used its whole budget and is flagged truncated."""
    stop = set(stop)
    for i, budget in enumerate(budgets):
        n = int(out["mask"][i].sum())
        assert out["mask"][i, :n].all() and not out["mask"][i, n:].any()
        assert (out["tokens"][i, n:] == pad).all()
        assert (out["logprobs"][i, n:] == 0).all() and (out["entropy"][i, n:] == 0).all()
        body = out["tokens"][i, :n].tolist()
        assert not stop & set(body[:-1]), f"row {i} continued after a stop token"
        assert 1 <= n <= budget
        assert bool(out["truncated"][i]) == (body[-1] not in stop)
        if body[-1] not in stop:
            assert n == budget

def check_continuations(model, rows, parents, cuts, prefixes, cont, entropy=True):
    """Each continuation k of row parents[k] from its prefix (cuts[k] tokens): its log-probs (and entropy) equal
    teacher forcing of prefix + continuation, scored from position cuts[k] on."""
    for k, (r, t) in enumerate(zip(parents, cuts)):
        n = int(cont["mask"][k].sum())
        full = torch.cat([torch.tensor(prefixes[k], dtype=torch.long), cont["tokens"][k, :n]])
        logp, ent = teacher_forced(model, rows[r], full, t, T_SAMPLE)
        torch.testing.assert_close(cont["logprobs"][k, :n], logp, atol=1e-4, rtol=0)
        if entropy:
            torch.testing.assert_close(cont["entropy"][k, :n], ent, atol=1e-4, rtol=0)



def aepo_args(data, out, model, *extra) -> list[str]:
    """A small AEPO run: 2 prompts x G = 4 per step, at most 16 new tokens (no --out when out is None)."""
    return ["--stage", "aepo", "--model", str(model), "--data", str(data), *(["--out", str(out)] if out else []),
            "--batch-size", "2", "--group-size", "4", "--max-response-len", "16", "--log-samples-every", "0",
            *map(str, extra)]


def checkpoint_params(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def saved_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)["state"]


# ----------------------------------------------------------------------------------------------------------
# Sampler


def test_sampler_logprobs_and_entropies_match_teacher_forcing(tiny, demo_data):
    """Images, a text-only prompt, left padding (prompts of three lengths), `repeats`, ragged stops, rows dropped
    from the batch as they finish, and branch prefixes: every sampled token's log-prob and entropy equal those of a
    teacher-forced plain forward to 1e-4 (fp32), and so do the trainer's (Policy on make_batch's right-padded whole
    sequences, and on shared_prompt_batch's four prompts once, an image-free one among them)."""
    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1, 2, "What is 2 + 3?"])
    assert len({len(p["ids"]) for p in prompts}) >= 3
    ids = special_ids_with_extra_stops(model, processor)
    for seed in range(50):  # the first seed whose draw covers every case: ragged stops, some rows truncated, and
        out = ares.sample(model, prompts, ids=ids, max_new_tokens=16, repeats=2, temperature=T_SAMPLE, top_p=TOP_P,
                          generator=torch.Generator().manual_seed(seed))  # parents long enough for the branches below
        lengths = out["mask"].sum(1)
        if (len(set(lengths.tolist())) >= 3 and out["truncated"].any() and not out["truncated"].all()
                and all(lengths[r] > t for r, t in ((0, 1), (3, 3), (6, 2)))):
            break
    assert out["tokens"].shape[0] == 8 and len(set(lengths.tolist())) >= 3, lengths  # ragged
    assert out["truncated"].any() and not out["truncated"].all()
    check_rows_end_properly(out, ids["stop"], ids["pad"], [16] * 8)
    rows = [prompts[i // 2] for i in range(8)]
    responses = [out["tokens"][i, :lengths[i]] for i in range(8)]
    for i in range(8):
        assert not set(responses[i].tolist()) & set(placeholder_ids(model))
        logp, ent = teacher_forced(model, rows[i], responses[i], 0, T_SAMPLE)
        torch.testing.assert_close(out["logprobs"][i, :lengths[i]], logp, atol=1e-4, rtol=0)
        torch.testing.assert_close(out["entropy"][i, :lengths[i]], ent, atol=1e-4, rtol=0)
    for batch in (ares.make_batch(model, rows, responses, ids["pad"], "cpu"),  # whole sequences (cold start)
                  ares.shared_prompt_batch(model, rows, responses, ids, "cpu")):  # the update's: each prompt once
        with torch.no_grad():
            logp, ent = ares.Policy(model)(batch, T_SAMPLE, with_entropy=True)
        m = batch["resp_mask"]
        assert torch.equal(m, out["mask"][:, :m.shape[1]])
        assert (logp - out["logprobs"][:, :m.shape[1]]).abs()[m].max() < 1e-4
        assert (ent - out["entropy"][:, :m.shape[1]]).abs()[m].max() < 1e-4

    # branches: continue rows 0, 3 and 6 from their own first tokens, with different budgets
    parents, cuts, budgets = [0, 3, 6], [1, 3, 2], [5, 9, 12]
    prefixes = [responses[r][:t].tolist() for r, t in zip(parents, cuts)]
    assert all(len(x) == t for x, t in zip(prefixes, cuts))
    cont = ares.sample(model, [rows[r] for r in parents], ids=ids, budgets=budgets, prefixes=prefixes,
                       temperature=T_SAMPLE, top_p=TOP_P, generator=torch.Generator().manual_seed(1))
    check_rows_end_properly(cont, ids["stop"], ids["pad"], budgets)
    check_continuations(model, rows, parents, cuts, prefixes, cont)


def test_eos_stops_a_row_and_pads_it(tiny, demo_data):
    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1])
    ids = ares.special_ids(model, processor)
    eos_model = copy.deepcopy(model)  # the same model with <|im_end|> made likely (about 1 in 5 per step)
    bias = torch.zeros(model.config.get_text_config().vocab_size)
    bias[ids["eot"]] = 5.0
    eos_model.get_output_embeddings().register_forward_hook(lambda module, args, logits: logits + bias)
    out = ares.sample(eos_model, prompts, ids=ids, max_new_tokens=12, repeats=4, temperature=1.0, top_p=1.0,
                      generator=torch.Generator().manual_seed(0))
    check_rows_end_properly(out, ids["stop"], ids["pad"], [12] * 8)
    lengths = out["mask"].sum(1)
    ended = [i for i in range(8) if out["tokens"][i, lengths[i] - 1] == ids["eot"]]
    assert 2 <= len(ended) and len(set(lengths[ended].tolist())) >= 2, lengths  # ragged EOS
    assert not out["truncated"][ended].any()
    for i in range(8):  # the EOS token's own log-prob is part of the response
        logp, _ = teacher_forced(eos_model, prompts[i // 4], out["tokens"][i, :lengths[i]], 0, 1.0)
        torch.testing.assert_close(out["logprobs"][i, :lengths[i]], logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.8), (1.3, 1.0), (1.0, 0.5)])
def test_sample_token_draws_from_the_top_p_nucleus_of_softmax_over_temperature(temperature, top_p):
    z = torch.tensor([2.0, 1.4, 1.1, 0.3, -0.5, -1.7, -3.0])  # distinct probabilities: no ties at the cut
    n = 40_000
    logits = z.repeat(n, 1)
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    tok, logp, entropy = ares.sample_token(logits, temperature, top_p, u)
    # numpy reference: p = softmax(z / T); the nucleus is the smallest set of most likely tokens with mass >= top_p
    p = np.exp(z.double().numpy() / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    k = int(np.searchsorted(np.cumsum(p[order]), top_p - 1e-12) + 1) if top_p < 1 else len(p)
    q = np.zeros_like(p)
    q[order[:k]] = p[order[:k]] / p[order[:k]].sum()
    freq = np.bincount(tok.numpy(), minlength=len(p)) / n
    assert (freq[q == 0] == 0).all(), "a token outside the nucleus was sampled"
    tv = 0.5 * np.abs(freq - q).sum()
    assert tv < 0.015, (tv, freq, q)  # E[TV] ~ 0.003 at n = 40k; 0.015 is > 5 standard deviations
    np.testing.assert_allclose(logp.numpy(), np.log(p)[tok.numpy()], atol=1e-5)  # untruncated log-prob
    np.testing.assert_allclose(entropy.numpy(), -(p * np.log(p)).sum(), atol=1e-5)


def test_sample_token_at_temperature_zero_is_greedy():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(3))
    tok, logp, _ = ares.sample_token(logits, 0.0, 0.9, torch.rand(5))
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).max(-1).values)


def host_reads_in(kv_class, monkeypatch) -> list[str]:
    """The list each host read of a tensor (truth value, .item(), .tolist(), int()/float()/index) inside
    kv_class.step is appended to, by name, from now on."""
    inside, reads, step = [False], [], kv_class.step

    def counted_step(self, *args, **kwargs):
        inside[0] = True
        try:
            return step(self, *args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(kv_class, "step", counted_step)
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        def read(t, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            if inside[0]:
                reads.append(_name)
            return _real(t, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)
    return reads


def test_an_eager_decode_step_never_waits_for_the_device(tiny, demo_data, monkeypatch):
    """The eager sampler's steps queue work and read nothing back: the loop looks at the device only at its checks
    (every CHECK_EVERY steps). Given a 2-D attention mask, Hugging Face's SDPA mask code read it on the host (a
    tensor's truth value) in every step, which on a GPU stalls the host until the step before has run. Counted here:
    every truth value, .item(), .tolist() or int()/float() of a tensor inside EagerKV.step, on prompts of three lengths
    (left padding) and on prompts of one length (no padding), with rows leaving the batch as they finish."""
    model, processor = tiny
    reads = host_reads_in(ares.EagerKV, monkeypatch)
    ids = ares.special_ids(model, processor)
    for picks in ([0, 1, "What is 2 + 3?"], [0, 0, 0]):
        prompts = encoded_prompts(processor, demo_data["rl"], picks)
        budgets = [3, 20, 5, 20, 2, 4]  # most rows done by the first check: they leave the batch there
        with torch.no_grad():
            out = ares.sample(model, prompts, ids=ids, budgets=budgets, repeats=2, generator=torch.Generator().manual_seed(0))
        assert out["mask"].sum(1).tolist() == budgets  # the random model never stops on its own
    assert reads == []


def test_the_eager_cache_drops_finished_rows_once_a_quarter_of_the_batch_is_done(tiny, demo_data, monkeypatch):
    """README "Reading ares.py": EagerKV, the default sampler's KV cache, lets finished rows leave the batch once a
    quarter of it is done, at a check (every CHECK_EVERY = 8 steps). 8 rows with budgets of 3, 12 and 20 tokens (no
    stop token): at the check after step 8 one row of 8 is done and the batch stays 8 rows;
    at the check after step 16 two are (a quarter) and the 6 live rows go on alone."""
    model, processor = tiny
    sizes, step = {}, ares.EagerKV.step

    def counted_step(self, model, tok, pos, u, t, *args, **kwargs):
        sizes[t] = len(tok)
        return step(self, model, tok, pos, u, t, *args, **kwargs)

    monkeypatch.setattr(ares.EagerKV, "step", counted_step)
    budgets = [3, 20, 20, 20, 20, 20, 20, 12]
    with torch.no_grad():
        out = ares.sample(model, encoded_prompts(processor, demo_data["rl"], [0, 1, 2, "What is 2 + 3?"]),
                          ids=dict(ares.special_ids(model, processor), stop=[]), budgets=budgets, repeats=2,
                          generator=torch.Generator().manual_seed(0))  # no stop token: each row runs its budget
    assert out["mask"].sum(1).tolist() == budgets
    assert [sizes[t] for t in sorted(sizes)] == [8] * 15 + [6] * 4, sizes  # steps t = 0..14, then 15..18


def test_a_sampler_prefill_runs_the_vision_tower_once_per_distinct_image(tiny, demo_data, monkeypatch):
    """README "Reading ares.py": prefill encodes each distinct image once (encode_images): a call whose rows share a
    prompt (a group's responses, its repeats) sends each image through the vision tower once, and the rows sample what
    they sample when each row's image is encoded for it."""
    model, processor = tiny
    base, seen = model.model, []
    real = base.get_image_features

    def counted(pixel_values, image_grid_thw, *args, **kwargs):
        seen.append(len(image_grid_thw))
        return real(pixel_values, image_grid_thw, *args, **kwargs)

    monkeypatch.setattr(base, "get_image_features", counted)
    a, b = encoded_prompts(processor, demo_data["rl"], [0, 1])
    assert a["pixel_values"] is not None and b["pixel_values"] is not None and len(a["image_grid_thw"]) == 1
    kw = dict(ids=dict(ares.special_ids(model, processor), stop=[]), max_new_tokens=4)
    with torch.no_grad():
        shared = ares.sample(model, [a, a, b], repeats=2, generator=torch.Generator().manual_seed(0), **kw)
    assert seen == [2], seen  # two distinct images for six rows
    seen.clear()
    with torch.no_grad():  # the same prompts, the first one's copy a dict of its own: its image is encoded again
        alone = ares.sample(model, [a, dict(a), b], repeats=2, generator=torch.Generator().manual_seed(0), **kw)
    assert seen == [3], seen
    torch.testing.assert_close(shared["logprobs"], alone["logprobs"], atol=1e-5, rtol=0)
    assert torch.equal(shared["tokens"], alone["tokens"])


def test_a_kv_pool_decode_step_never_waits_for_the_device(tiny, demo_data, monkeypatch):
    """README "Compile": on the KV pool too, the decode loop looks at which rows are done only every CHECK_EVERY = 8
    steps (its only wait for the device: no .item() or .any() per step). Counted as for the eager sampler above:
    every truth value, .item(), .tolist() or int()/float() of a tensor inside KVPool.step (its step run uncompiled, as
    under --fsdp), on left-padded prompts with per-row budgets, rows leaving the bucket at the checks."""
    model, processor = tiny
    reads = host_reads_in(ares.KVPool, monkeypatch)
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1, "What is 2 + 3?"])
    budgets = [3, 20, 5, 20, 2, 4]  # most rows done by the first check: they leave the 8-row bucket there
    with torch.no_grad():
        out = ares.sample(model, prompts, ids=ares.special_ids(model, processor), budgets=budgets, repeats=2,
                          generator=torch.Generator().manual_seed(0), pool=ares.KVPool(8, 400, compile=False))
    assert out["mask"].sum(1).tolist() == budgets  # the random model never stops on its own: 20 steps ran
    assert reads == []
    assert ares.CHECK_EVERY == 8


def test_every_attention_implementation_samples_what_sdpa_samples(tiny_ckpt, demo_data):
    """--attn eager and sdpa (the default) give the same rollouts on left-padded prompts, rows leaving the batch: each
    attention gets the mask form it reads (eager adds a 4-D mask to its scores, so the bool mask SDPA takes would let
    every row attend to its padding)."""
    cpu, out = torch.device("cpu"), {}
    for attn in ("sdpa", "eager"):
        model, processor = ares.load_model(str(tiny_ckpt), ares.Config(attn=attn, dtype="fp32"), cpu)
        assert ares.text_decoder(model).config._attn_implementation == attn
        prompts = encoded_prompts(processor, demo_data["rl"], [0, 1, "What is 2 + 3?"])
        assert len({len(p["ids"]) for p in prompts}) == 3
        with torch.no_grad():
            out[attn] = ares.sample(model.eval(), prompts, ids=ares.special_ids(model, processor),
                                    budgets=[3, 20, 5, 20, 2, 4], repeats=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["sdpa"]["tokens"], out["eager"]["tokens"])
    assert (out["sdpa"]["logprobs"] - out["eager"]["logprobs"]).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------
# Branching


def python_window_entropy(H: list[float], w: int) -> list[float | None]:
    return [sum(H[t:t + w]) / w if t + w <= len(H) else None for t in range(len(H))]


def reference_branch_points(hbar: list[list[float | None]], hwe: list[list[bool]], budget: int, max_per: int, w: int):
    """§2 step 3 as a plain loop: candidates by decreasing Hbar (ties: row-major order), skip t = 0, at most
    max_per per parent, at least w apart within a parent, at most budget in all."""
    cands = sorted(((hbar[r][t], r, t) for r in range(len(hwe)) for t in range(len(hwe[r])) if hwe[r][t]),
                   key=lambda c: -c[0])
    chosen = []
    for _, r, t in cands:
        mine = [s for q, s in chosen if q == r]
        if t >= 1 and len(mine) < max_per and all(abs(t - s) >= w for s in mine) and len(chosen) < budget:
            chosen.append((r, t))
    return chosen


def test_choose_branch_points_obeys_its_constraints_against_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        n, R = rng.randint(1, 3), rng.randint(1, 9)
        w, budget, max_per = rng.randint(1, 3), rng.randint(0, 5), rng.randint(1, 3)
        hbar = [[rng.random() for _ in range(R)] for _ in range(n)]
        hwe = [[rng.random() < 0.5 for _ in range(R)] for _ in range(n)]
        got = ares.choose_branch_points(torch.tensor(hbar), torch.tensor(hwe), budget, max_per, w)
        got = [(int(r), int(t)) for r, t in got]
        assert got == reference_branch_points(hbar, hwe, budget, max_per, w), (trial, got)

        def feasible(points):
            for r in range(n):
                ts = [t for q, t in points if q == r]
                if len(ts) > max_per or any(abs(a - b) < w for a, b in itertools.combinations(ts, 2)):
                    return False
            return len(points) <= budget and all(hwe[r][t] and t >= 1 for r, t in points)

        # brute force over every candidate: the choice is feasible and maximal (nothing more could be added)
        assert feasible(got)
        others = [(r, t) for r in range(n) for t in range(R) if (r, t) not in got]
        assert not any(feasible(got + [c]) for c in others)


def rollout_config(**kw) -> ares.Config:
    cfg = ares.Config(stage="aepo", model="tiny", data="unused", group_size=4, branch_samples=2, max_response_len=16,
                      window=2, entropy_quantile=0.5, max_branches_per_response=1, temperature=T_SAMPLE, top_p=TOP_P)
    return ares.resolve_stage_defaults(dataclasses.replace(cfg, **kw), "aepo")


def test_branches_continue_their_parents_and_train_only_their_own_tokens(tiny, demo_data):
    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1, 2])
    cfg = rollout_config()
    G, B, w = cfg.group_size, cfg.branch_samples, cfg.window
    ids = ares.special_ids(model, processor)
    ro = ares.rollout_groups(model, prompts, cfg, ids, torch.Generator().manual_seed(0))
    N = len(prompts) * G
    assert ro.tokens.shape[0] == N and ro.parent.shape == (N,) and ro.branch_at.shape == (N,)
    lengths = ro.resp_mask.sum(1)
    # tau: mean over the first-pass responses of each one's q-quantile of token entropies (numpy's linear quantile)
    first = [i for i in range(N) if i % G < G - B]
    assert all(ro.parent[i] < 0 and ro.branch_at[i] == 0 for i in first)
    quantiles = [np.quantile(ro.entropy[i, :lengths[i]].double().numpy(), cfg.entropy_quantile) for i in first]
    assert ro.tau.tolist() == pytest.approx([float(np.mean(quantiles))] * N, abs=1e-5)  # one round: every row's
    n_branches = 0
    for p in range(len(prompts)):
        group = range(p * G, (p + 1) * G)
        # every branch point is a full-window HWE position of a first-pass parent in the same group, chosen as §3.2
        hbar = [python_window_entropy(ro.entropy[i, :lengths[i]].tolist(), w) for i in group if i % G < G - B]
        hwe = [[h is not None and h >= ro.tau[0] for h in row] for row in hbar]
        hbar = [[h if h is not None else 0.0 for h in row] for row in hbar]
        want = reference_branch_points(hbar, hwe, B, cfg.max_branches_per_response, w)
        got = [(int(ro.parent[i]) - p * G, int(ro.branch_at[i])) for i in group if ro.parent[i] >= 0]
        assert got == want
        n_branches += len(got)
    assert n_branches > 0, "the test needs some branches: lower the entropy quantile"
    for i in range(N):
        n, t, parent = int(lengths[i]), int(ro.branch_at[i]), int(ro.parent[i])
        assert ro.resp_mask[i, :n].all() and not ro.resp_mask[i, n:].any()
        expect_loss = torch.arange(ro.tokens.shape[1]) >= t
        assert torch.equal(ro.loss_mask[i], expect_loss & ro.resp_mask[i])  # starts at the branch point
        if parent >= 0:
            assert parent // G == i // G and ro.parent[parent] < 0 and 1 <= t < n
            assert torch.equal(ro.tokens[i, :t], ro.tokens[parent, :t])  # the prefix is the parent's
            assert torch.equal(ro.logprobs[i, :t], ro.logprobs[parent, :t])
            # the whole branch row, prefix and continuation, is a sequence the policy could have sampled
            logp, _ = teacher_forced(model, prompts[i // G], ro.tokens[i, :n], 0, T_SAMPLE)
            torch.testing.assert_close(ro.logprobs[i, :n], logp, atol=1e-4, rtol=0)
        else:
            assert t == 0


def test_a_branch_resumes_from_exactly_its_parents_first_branch_at_tokens(tiny, demo_data, monkeypatch):
    """§3.2 branching: a branch at t keeps the parent's tokens 0..t-1 (t tokens, not t + 1) and samples its own from
    position t on, with the budget left, --max-response-len - t, so no row is longer than --max-response-len. The
    sampler's calls are recorded: the prefix each branch was given, its budget, and what it sampled, which must be
    the branch row's tokens from t on."""
    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1, 2])
    cfg = rollout_config()
    G, L = cfg.group_size, cfg.max_response_len
    calls, real_sample = [], ares.sample

    def spy(*args, **kw):
        out = real_sample(*args, **kw)
        calls.append((kw.get("prefixes"), kw.get("budgets"), out))
        return out

    monkeypatch.setattr(ares, "sample", spy)
    ro = ares.rollout_groups(model, prompts, cfg, ares.special_ids(model, processor), torch.Generator().manual_seed(0))
    N = len(prompts) * G
    lengths = ro.resp_mask.sum(1).tolist()
    assert max(lengths) <= L
    branch_calls = [c for c in calls if c[0] is not None]
    assert len(branch_calls) == 1  # one batch of branch rows (the default --rollout-batch holds them all)
    prefixes, budgets, out = branch_calls[0]
    rows = [i for i in range(N) if i % G >= G - cfg.branch_samples]  # the branch slots, in the order they are sampled
    assert len(prefixes) == len(budgets) == len(rows)
    n_branches = 0
    for k, i in enumerate(rows):
        t, parent, n = int(ro.branch_at[i]), int(ro.parent[i]), lengths[i]
        want_prefix = [] if parent < 0 else ro.tokens[parent, :t].tolist()  # a shortfall slot: a fresh sample
        assert prefixes[k] == want_prefix and len(prefixes[k]) == t, (i, t)
        assert budgets[k] == L - t, (i, t)
        m = int(out["mask"][k].sum())
        assert m <= L - t and n == t + m, (i, t, m, n)
        assert ro.tokens[i, t:n].tolist() == out["tokens"][k, :m].tolist()  # its own tokens start at t
        n_branches += parent >= 0
    assert n_branches > 0, "the test needs some branches"


def test_an_eager_branch_call_holds_no_more_kv_than_rollout_batch_full_rows(tiny, demo_data, monkeypatch):
    """--rollout-batch rows of --max-prompt-len + --max-response-len tokens each is the KV the plan gives the sampler.
    The eager cache pads every row of a call to its longest prompt + prefix and its largest budget, so branch rows
    with a long prefix (small budget) beside rows with a short one (large budget) held up to a prompt + 2 L columns a
    row: here one branch at t = 40 among seven at t = 1 (a first pass whose entropy peaks are set), 8 rows in one
    call, 1.4 x the plan. The cache's own tensors are measured at every decode step (stop tokens off: every row
    spends its budget)."""
    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1, 2, 3])
    L = 48
    cfg = rollout_config(max_response_len=L, window=1, entropy_quantile=0.95, max_branches_per_response=2,
                         rollout_batch=8, max_prompt_len=max(len(p["ids"]) for p in prompts))
    ids = dict(ares.special_ids(model, processor), stop=[])
    text = data_prep.tokenizer_of(processor)("1", add_special_tokens=False)["input_ids"][0]
    real_sample, peak = ares.sample, []

    def first_pass_then_real(model, prompts, **kw):  # prompt p's 2 fresh rows: entropy 0.01, one peak of 1
        if kw.get("prefixes") is not None:
            return real_sample(model, prompts, **kw)
        n = len(prompts) * kw["repeats"]
        entropy = torch.full((n, L), 0.01)
        for row in range(n):
            entropy[row, 40 if row == 0 else 1] = 1.0  # prompt 0's first row peaks late: its branch starts at 40
        return dict(tokens=torch.full((n, L), text), logprobs=torch.zeros(n, L), entropy=entropy,
                    mask=torch.ones(n, L, dtype=torch.bool), truncated=torch.ones(n, dtype=torch.bool))

    step = ares.EagerKV.step

    def measured(self, *args):
        keys = self.cache.layers[0].keys  # (rows, KV heads, columns, head dim)
        peak.append(keys.shape[0] * keys.shape[2])
        return step(self, *args)

    monkeypatch.setattr(ares, "sample", first_pass_then_real)
    monkeypatch.setattr(ares.EagerKV, "step", measured)
    ro = ares.rollout_groups(model, prompts, cfg, ids, torch.Generator().manual_seed(0))
    assert sorted(ro.branch_at[ro.parent >= 0].tolist()) == [1] * 7 + [40]  # the mix the test is about
    assert ro.resp_mask.sum(1).eq(L).all()  # every branch row spent its budget: L tokens with its prefix
    assert max(peak) <= cfg.rollout_batch * (cfg.max_prompt_len + L), (max(peak), cfg.rollout_batch * (cfg.max_prompt_len + L))


def test_sampler_calls_split_branch_rows_by_the_columns_their_cache_pads_to():
    """sampler_calls on random rows: each row in one call, in the rows' order, at most `cap` rows a call, and each call's
    KV columns, counted here from its rows (rows x (longest head + largest budget)), within `room`; no room: rows only."""
    random.seed(1)
    for _ in range(40):
        heads, budgets = [random.randint(1, 30) for _ in range(5)], [random.randint(1, 30) for _ in range(5)]
        room = random.randint(60, 200)
        jobs = list(range(10, 15))
        calls = ares.sampler_calls(jobs, heads, budgets, 3, room)
        assert sorted(j for c in calls for j in c) == jobs and all(c == sorted(c) and len(c) <= 3 for c in calls)
        cost = lambda c: len(c) * (max(heads[j - 10] for j in c) + max(budgets[j - 10] for j in c))  # noqa: E731
        assert all(cost(c) <= room or len(c) == 1 for c in calls), (heads, budgets, room, calls)
        firsts = [min(c, key=lambda j: (heads[j - 10], j)) for c in calls[1:]]  # filled shortest heads first: each
        assert all(len(c) == 3 or cost(c + [j]) > room for c, j in zip(calls, firsts))  # call took all it could
        assert ares.sampler_calls(jobs, heads, budgets, 3) == ares.sampler_calls(jobs, heads, budgets, 3, 10**9)


def test_groups_have_g_responses_without_hwe_candidates(tiny, demo_data):
    """With no HWE window at all (a trigger-word table that matches nothing) the whole branch budget is spent on
    fresh samples: still exactly G per group, none a branch, every token trained."""
    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1])
    cfg = rollout_config()
    ids = ares.special_ids(model, processor)
    none = torch.zeros(model.config.get_text_config().vocab_size, dtype=torch.bool)
    ro = ares.rollout_groups(model, prompts, cfg, ids, torch.Generator().manual_seed(0), triggers=none)
    assert ro.tokens.shape[0] == len(prompts) * cfg.group_size
    assert (ro.parent == -1).all() and (ro.branch_at == 0).all()
    assert torch.equal(ro.loss_mask, ro.resp_mask)
    assert (ro.resp_mask.sum(1) >= 1).all()


def test_branch_samples_zero_is_plain_group_sampling(tiny, demo_data):
    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1])
    cfg = rollout_config(branch_samples=0)
    ids = ares.special_ids(model, processor)
    ro = ares.rollout_groups(model, prompts, cfg, ids, torch.Generator().manual_seed(5))
    plain = ares.sample(model, prompts, ids=ids, max_new_tokens=cfg.max_response_len, repeats=cfg.group_size,
                        temperature=T_SAMPLE, top_p=TOP_P, generator=torch.Generator().manual_seed(5))
    R = plain["tokens"].shape[1]
    assert ro.tokens.shape == (len(prompts) * cfg.group_size, R)
    assert torch.equal(ro.tokens, plain["tokens"]) and torch.equal(ro.resp_mask, plain["mask"])
    assert torch.equal(ro.logprobs, plain["logprobs"]) and torch.equal(ro.loss_mask, plain["mask"])
    assert (ro.parent == -1).all()


# ----------------------------------------------------------------------------------------------------------
# The update


def test_under_gradient_checkpointing_the_update_keeps_the_shared_prompt_forward(tiny, demo_data):
    """With --grad-checkpointing (the trainer's make_trainable) the update's gradient forward stays the shared-prompt
    one (each distinct prompt once; test_families checks it against whole sequences, gradients included) and every
    decoder layer of both passes is recomputed in backward; the log-probs are those of the pass without gradients."""
    from types import SimpleNamespace

    model = ares.make_trainable(copy.deepcopy(tiny[0]), ares.Config(grad_checkpointing=True))
    prompts = encoded_prompts(tiny[1], demo_data["rl"], [0, 1])
    run = SimpleNamespace(hf=model, ids=ares.special_ids(model, tiny[1]))
    tokens = torch.randint(100, 300, (4, 6), generator=torch.Generator().manual_seed(0))
    ro = SimpleNamespace(tokens=tokens, resp_mask=torch.arange(6)[None] < torch.tensor([[6], [3], [5], [2]]))
    counts = LayerRecomputes(model)
    batch = ares.teacher_forced(run, "cpu", prompts, ro, [0, 1, 2, 3], 2)
    assert batch["input_ids"].shape[0] == 2 and "prompt_index" in batch
    logp = ares.Policy(model)(batch)[0]
    (logp * batch["resp_mask"]).sum().backward()
    assert counts.recomputed == counts.layer == 2 * model.config.get_text_config().num_hidden_layers
    with torch.no_grad():
        again = ares.Policy(model)(batch)[0]
    torch.testing.assert_close(logp[ro.resp_mask], again[ro.resp_mask], atol=1e-6, rtol=0)


def test_updates_raise_the_logprob_of_rewarded_responses_and_lower_the_others(tiny, demo_data):
    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1])
    cfg = rollout_config(branch_samples=0, kl_coef=0.0, lr=1e-3, micro_batch_size=3, minibatches=2, max_response_len=10)
    G = cfg.group_size
    hf = copy.deepcopy(model)
    run = ares.Run(hf=hf, processor=processor, ids=ares.special_ids(hf, processor))
    ares.prepare_training(cfg, run, torch.device("cpu"), total=10)
    run.state.update(kappa=torch.ones(3, dtype=torch.float64))
    ro = ares.rollout_groups(hf, prompts, cfg, run.ids, torch.Generator().manual_seed(0))
    N, lengths = ro.tokens.shape[0], ro.resp_mask.sum(1)
    acc = torch.tensor([1.0, 1.0, 0.0, 0.0] * len(prompts))  # the first two responses of each group are "right"
    adv = ares.grpo_advantages(acc, G).float()
    bucket = ares.difficulty_buckets(acc, G)
    no_hwe = torch.zeros_like(ro.resp_mask)

    def seq_logprobs():
        return torch.tensor([teacher_forced(hf, prompts[i // G], ro.tokens[i, :lengths[i]], 0, T_SAMPLE)[0].sum()
                             for i in range(N)])

    before = seq_logprobs()
    for k in range(3):
        ares.aepo_update(cfg, run, None, torch.device("cpu"), prompts, ro, adv, bucket, no_hwe,
                         torch.ones(N, dtype=torch.bool), torch.Generator().manual_seed(k))
    change = seq_logprobs() - before
    assert (change[acc == 1] > 0).all() and (change[acc == 0] < 0).all(), change


# ----------------------------------------------------------------------------------------------------------
# The loop: one process, torchrun (DDP and FSDP2), resume, degenerate batches


def test_three_aepo_steps_in_one_process(tiny_ckpt, demo_data, tmp_path):
    out = tmp_path / "run"
    ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 3, "--keep-uniform-groups", "--minibatches", 2,
                        "--micro-batch-size", 3, "--window", 2, "--entropy-quantile", 0.5))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("reward", "acc", "groups_kept", "groups", "len", "n_he", "tau", "kl_inside", "kl_outside_mean",
                    "clip_frac", "entropy", "branches", "branch_acc", "parent_acc", "time_sample", "time_score",
                    "time_update", "rollout_tokens_per_s", "n_easy", "n_medium", "n_hard", "kappa_hard", "target_hard"):
            assert key in r, key
        assert r["groups_kept"] == r["groups"] == 2 and "skipped_reason" not in r
        assert r["n_easy"] + r["n_medium"] + r["n_hard"] == 8
        assert r["logprob_gap"] < 1e-4  # old log-probs (recomputed, 2 minibatches) = the sampler's own
    assert sum(r["branches"] for r in rows) > 0
    state = saved_state(out / "final")
    assert state["step"] == 3 and state["tau_history"] == pytest.approx([r["tau"] for r in rows])
    assert not torch.equal(state["kappa"], torch.ones(3, dtype=torch.float64))  # the KL controller ran
    start, end = checkpoint_params(tiny_ckpt), checkpoint_params(out / "final")
    assert any(not torch.equal(start[k], end[k]) for k in start)


BUCKET_REWARD = '''
seen = []


def score(record, response):
    """By the order records are first seen: the first all right, the second's first 2 responses right (its fresh
    samples: the branches are graded after them) and the rest wrong, the others all wrong. A step of 3 prompts has
    one easy, one medium and one hard group, and the medium group's branches are wrong where their parents are right.
    README (forking: a reward): the record holds every field of the JSONL row, the demo's own too."""
    assert {"id", "question", "answer", "images", "difficulty", "style"} <= set(record), sorted(record)
    seen.append(record["id"])
    first = list(dict.fromkeys(seen))
    return [1.0, float(seen.count(record["id"]) <= 2), 0.0][min(first.index(record["id"]), 2)]
'''


def test_each_logged_number_is_its_readme_definition_over_the_steps_responses(tiny_ckpt, demo_data, tmp_path,
                                                                             monkeypatch):
    """README "What is logged", worked out by Python loops over the rollouts and scores the step logged: reward, acc,
    len (response tokens), entropy (mean token entropy), n_he (HWE tokens per response), truncated, branches,
    branch_acc vs parent_acc, and per bucket n_, len_, n_he_, acc_ and branched_ (share of the bucket's responses
    that are branches) over every group drawn; kl_outside_ / kl_inside_ None where no kept response of the bucket
    had such a token; per difficulty label level_<label>_len, _n_he, _acc and _groups_<bucket>. The hook makes one
    easy, one medium and one hard group; the filter drops the easy and hard."""
    seen = []
    real = ares.score_groups
    monkeypatch.setattr(ares, "score_groups", lambda ro, *a, **kw: seen.append((ro, real(ro, *a, **kw))) or seen[-1][1])
    hook = tmp_path / "hook.py"
    hook.write_text(BUCKET_REWARD)
    ares.main(aepo_args(demo_data["rl"], tmp_path / "run", tiny_ckpt, "--steps", 1, "--batch-size", 3,
                        "--branch-samples", 2, "--reward-fn", f"{hook}:score", "--seed", 1,  # draws 3 levels
                        "--ppo-epochs", 2))  # 2 updates: old log-probs recomputed, logprob_gap logged
    (row,), ((ro, sc),) = read_jsonl(tmp_path / "run" / "metrics.jsonl"), seen
    N = len(ro.texts)
    acc, parent, mask = ro.acc.tolist(), ro.parent.tolist(), ro.resp_mask.tolist()
    length = [sum(m) for m in mask]
    n_he = [sum(h) for h in sc.hwe.tolist()]
    branch = [i for i in range(N) if parent[i] >= 0]
    assert branch and sorted(set(sc.bucket.tolist())) == [0, 1, 2]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    entropy = sum(e for i in range(N) for e, m in zip(ro.entropy[i].tolist(), mask[i]) if m) / sum(length)
    expected = dict(reward=mean(sc.rewards.tolist()), acc=mean(acc), len=mean(length), n_he=mean(n_he),
                    entropy=entropy, truncated=mean([float(t) for t in ro.truncated.tolist()]), branches=len(branch),
                    branch_acc=mean([acc[i] for i in branch]), parent_acc=mean([acc[parent[i]] for i in branch]),
                    groups=3, groups_kept=1)
    for b, name in enumerate(ares.BUCKETS):
        rows = [i for i in range(N) if sc.bucket[i] == b]
        expected.update({f"n_{name}": len(rows), f"len_{name}": mean([length[i] for i in rows]),
                         f"n_he_{name}": mean([n_he[i] for i in rows]), f"acc_{name}": mean([acc[i] for i in rows]),
                         f"branched_{name}": mean([float(parent[i] >= 0) for i in rows])})
        kept = [i for i in rows if sc.keep[i]]
        trained = [(h and m) for i in kept for h, m in zip(sc.hwe[i].tolist(), ro.loss_mask[i].tolist())]
        outside = [(not h and m) for i in kept for h, m in zip(sc.hwe[i].tolist(), ro.loss_mask[i].tolist())]
        assert (row[f"kl_inside_{name}"] is None) == (not any(trained)), name
        assert (row[f"kl_outside_{name}"] is None) == (not any(outside)), name
    assert [row[f"acc_{name}"] for name in ares.BUCKETS] == [1.0, 0.5, 0.0] and row["branch_acc"] < row["parent_acc"]
    assert row["kl_outside_easy"] is None and row["kl_outside_hard"] is None and row["kl_outside_medium"] is not None
    # the records carry a difficulty label: per label, the means over its responses and its groups per online bucket
    level_of = {r["id"]: r["difficulty"] for r in data_prep.load_records(str(demo_data["rl"]))}
    graded = data_prep.load_reward_fn(f"{hook}:score").__globals__["seen"]  # record ids, one per response in row order
    level = [level_of[i] for i in graded]
    assert len(level) == N and len({level[i] for i in range(0, N, 4)}) == 3  # each prompt's level differs
    for label in ("easy", "medium", "hard"):
        rows = [i for i in range(N) if level[i] == label]
        expected.update({f"level_{label}_len": mean([length[i] for i in rows]),
                         f"level_{label}_n_he": mean([n_he[i] for i in rows]),
                         f"level_{label}_acc": mean([acc[i] for i in rows])})
        expected.update({f"level_{label}_groups_{name}": sum(level[i] == label and int(sc.bucket[i]) == b
                                                             for i in range(0, N, 4))  # a group: G = 4 rows
                         for b, name in enumerate(ares.BUCKETS)})
    # and every key the README's paragraph names is in the row (<label>, <bucket> and * a level or bucket; `_n_he`
    # and `_acc` short for level_<label>_n_he and _acc), but for those of a step that did not occur here
    readme = (ROOT / "README.md").read_text().split("### What is logged (AEPO, one JSON line per step)\n")[1]
    named = set(re.findall(r"`([a-z_<>*]+)`", readme.split("\n\n")[0])) - {"difficulty", "skipped_reason"}
    assert len(named) > 35
    for key in named:
        key = re.sub(r"<label>|<bucket>|\*", "(easy|medium|hard)", "level_<label>" + key if key[0] == "_" else key)
        assert any(re.fullmatch(key, k) for k in row), key
    numbers = {k: v for k, v in expected.items() if v is not None}  # None: a label no prompt of the step had
    assert {k: row[k] for k in expected if k not in numbers} == {k: None for k in expected if k not in numbers}
    assert {k: row[k] for k in numbers} == pytest.approx(numbers, rel=1e-6)  # entropy: float32 sums in the trainer


def test_compiled_sampler_compiles_nothing_after_step_2(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """--compile with branching and --max-refill-rounds 2, under a reward that leaves some groups all right or all
    wrong, so that sampler calls of many row counts and lengths follow each other (first passes, branches, refill
    rounds, last chunks). torch._dynamo's own counter of compiled graphs, read at the end of every step: graphs are
    compiled in the first two steps and none after, and the run logs the same counts (graphs_compiled). The compiled
    sampler's log-probs are the trainer's (logprob_gap). Backend aot_eager: dynamo traces, guards and recompiles
    as with inductor, without generating code, which would cost a cold CPU compile (inductor: test_bench)."""
    from torch._dynamo.utils import counters

    reward = tmp_path / "reward.py"
    reward.write_text("def score(record, response):\n    return float(len(response) % 3 == 0)\n")
    seen, log, step, shapes = [], ares.Metrics.log, ares.KVPool.step, set()
    monkeypatch.setattr(ares.Metrics, "log", lambda self, row, show: seen.append(counters["stats"]["unique_graphs"])
                        or log(self, row, show))
    monkeypatch.setattr(ares.KVPool, "step", lambda self, model, tok, *a: shapes.add((len(tok), self.Lb))
                        or step(self, model, tok, *a))
    before = counters["stats"]["unique_graphs"]
    out = tmp_path / "run"
    ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 6, "--compile", "--compile-backend", "aot_eager",
                        "--max-refill-rounds", 2, "--reward-fn", f"{reward}:score", "--minibatches", 2,
                        "--batch-size", 4, "--window", 2, "--entropy-quantile", 0.5))
    rows = read_jsonl(out / "metrics.jsonl")
    per_step = [b - a for a, b in zip([before] + seen, seen)]
    assert len(per_step) == 6 and sum(per_step[:2]) > 0 and per_step[2:] == [0] * 4, per_step
    assert [r["graphs_compiled"] for r in rows] == per_step
    assert len({b for b, _ in shapes}) >= 3, shapes  # the decode step ran on several row buckets (rows, columns)
    # README (compile): a call's rows sit in a bucket of 2, 4, 8, ... up to --rollout-batch (auto: 4 prompts x 2 = 8)
    assert {b for b, _ in shapes} == {2, 4, 8}, shapes
    assert max(r["rollout_rounds"] for r in rows) > 1 and all(r["branches"] > 0 for r in rows)
    assert all(r["logprob_gap"] < 1e-4 for r in rows if r.get("logprob_gap") is not None)
    assert any(r.get("logprob_gap") is not None for r in rows)


def test_rollout_batch_auto_is_the_memory_plans_formula_and_bounds_every_sampler_call(tiny_ckpt, tiny, demo_data,
                                                                                       tmp_path, monkeypatch, capsys):
    """--rollout-batch auto (the default), the device's free memory fixed: the rows printed at start are
    (free - 5 GiB kept - gradients - AdamW moments) // (KV bytes a token x (--max-prompt-len + --max-response-len)),
    worked out here from the tiny model's config and its trainable (language-model) parameters, and no sampler call
    decodes more rows at once."""
    model = tiny[0]
    text = model.config.get_text_config()
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    row = kv_per_token * (64 + 16)  # this run's --max-prompt-len and --max-response-len, fp32 on a CPU
    trainable = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    free = 5 * 2 ** 30 + 12 * trainable + 5.5 * row  # room for 5 rows after 4 B of gradient and 8 B of AdamW a weight
    monkeypatch.setattr(ares, "free_memory", lambda device: free)
    calls, sample = [], ares.sample
    monkeypatch.setattr(ares, "sample", lambda model, prompts, **kw: calls.append(len(prompts) * kw.get("repeats", 1))
                        or sample(model, prompts, **kw))
    prefills, batch_of = [], ares.prompt_batch

    def prefill_batch(*args, **kw):  # a sampler prefill's forward: its (rows, padded tokens)
        batch = batch_of(*args, **kw)
        if "length" in kw:
            prefills.append(tuple(batch["input_ids"].shape))
        return batch

    monkeypatch.setattr(ares, "prompt_batch", prefill_batch)
    ares.main(aepo_args(demo_data["rl"], tmp_path / "run", tiny_ckpt, "--steps", 1, "--batch-size", 4,
                        "--keep-uniform-groups", "--micro-batch-size", 1, "--max-prompt-len", 64))
    assert "--rollout-batch auto: 5 rows per rank" in capsys.readouterr().out
    assert calls and max(calls) == 5, calls  # 4 prompts x 2 fresh rows: calls of 2 prompts, then branches 5 + 3
    # README (memory plan): a prefill forward reads at most --micro-batch-size x (--max-prompt-len + --max-response-len)
    # padded tokens, 1 x (64 + 16) here; the branch calls' 5 rows with their prefixes need more, so they go in parts
    assert max(rows * L for rows, L in prefills) <= 64 + 16 and len(prefills) > 4, prefills


def test_a_micro_batch_whose_activations_cannot_fit_beside_the_update_is_warned_of_at_start(tiny, monkeypatch, capsys):
    """The defaults at real size (2 rows of 4,096 + 16,384 tokens, no --grad-checkpointing: ~170 GiB of activations for
    3B) ran out of memory only at the first long update, on a GPU; without --compile nothing at start compared them with
    the memory left. Here the free memory is set between the activations of a full micro-batch with and without
    checkpointing, worked out by hand from the tiny model's config (fp32 input of each layer + one layer's 6 hidden and
    4 MLP-width values a token in bf16, or every layer's; 3 fp32 (rows, 1024, vocab) head chunks), beside the 5 GiB
    reserve and 12 B (gradients, AdamW) a trainable weight: a warning without checkpointing, none with it. (A GPU's plan:
    nothing here touches the device; on a CPU the host's memory is not warned of.)"""
    model = tiny[0]
    text = model.config.get_text_config()
    h, n_layers, f, V = text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size
    cfg = ares.resolve_stage_defaults(ares.Config(stage="aepo", model="tiny", data="x", rollout_batch="4"), "aepo")
    rows, tokens = cfg.micro_batch_size, cfg.micro_batch_size * (cfg.max_prompt_len + cfg.max_response_len)
    head, layer = 3 * rows * 1024 * V * 4, tokens * (6 * h + 4 * f) * 2
    with_ckpt, without = n_layers * tokens * h * 4 + layer + head, n_layers * (tokens * h * 4 + layer) + head
    assert with_ckpt < without
    trainable = 1000
    free = 5 * 2 ** 30 + 12 * trainable + (with_ckpt + without) / 2
    monkeypatch.setattr(ares, "free_memory", lambda device: free)
    run = SimpleNamespace(hf=model, n_trainable=trainable, n_params=trainable, opt=SimpleNamespace(state={}), model=None,
                          state={})
    for checkpointing in (False, True):
        ares.rollout_memory(dataclasses.replace(cfg, grad_checkpointing=checkpointing), run, torch.device("cuda"))
        said = capsys.readouterr().out
        assert ("warning: an update micro-batch" in said) == (not checkpointing), said
        if not checkpointing:
            assert f"needs about {without / 2 ** 30:.1f} GiB" in said, said
    ares.rollout_memory(cfg, run, torch.device("cpu"))  # the host's memory is no GPU's: its 5 GiB reserve is CUDA's
    assert "warning" not in capsys.readouterr().out
    # --compile: the KV pool (4 rows and a spare, of one column more; bf16) stays allocated through the update, so the
    # activations fit only beside it: free memory half a pool short warns, a whole pool's does not
    per_token = ares.kv_bytes_per_token(text, torch.bfloat16)
    pool = 5 * (cfg.max_prompt_len + cfg.max_response_len + 1) * per_token
    pooled = dataclasses.replace(cfg, grad_checkpointing=True, compile=True, compile_backend="eager")
    for extra, warned in ((pool // 2, True), (pool, False)):
        monkeypatch.setattr(ares, "free_memory", lambda device: 5 * 2 ** 30 + 12 * trainable + with_ckpt + extra)
        ares.rollout_memory(pooled, run, torch.device("cuda"))
        assert ("warning: an update micro-batch" in capsys.readouterr().out) == warned, extra


def test_rollout_batch_auto_under_compile_picks_rows_whose_kv_pool_fits_the_room(tiny, monkeypatch, capsys):
    """--rollout-batch auto with --compile sizes the KV pool that stays allocated through the update: KVPool allocates
    its rows and a spare one (at least 2 + 1), each of --max-prompt-len + --max-response-len + 1 columns. The rows must
    make that pool fit the room kv_room leaves for it. Before, the rows were the room over the plain rows' bytes: the
    pool took one row more (0.7 GiB for 3B, 1.1 GiB for 7B at 20k tokens) and three where the room held one, out of
    the 5 GiB a GPU keeps for its context, NCCL and the sampler's logits. Here the room is k plain rows exactly; a
    room that holds no pool is warned of."""
    model = tiny[0]
    cfg = ares.resolve_stage_defaults(ares.Config(stage="aepo", model="tiny", data="x", compile=True,
                                                  compile_backend="eager", batch_size=64), "aepo")
    row_tokens = cfg.max_prompt_len + cfg.max_response_len
    per_token = ares.kv_bytes_per_token(model.config.get_text_config(), torch.bfloat16)  # a GPU's compute dtype
    monkeypatch.setattr(ares, "free_memory", lambda device: 2 ** 40)
    for k in (1, 2, 3, 10, 40):
        room = k * row_tokens * per_token
        monkeypatch.setattr(ares, "kv_room", lambda *args, **kwargs: room)
        run = SimpleNamespace(hf=model, n_trainable=1000, n_params=1000, opt=SimpleNamespace(state={}), model=None,
                              state={})
        ares.rollout_memory(dataclasses.replace(cfg, rollout_batch="auto"), run, torch.device("cuda"))
        rows, said = run.state["rollout_batch"], capsys.readouterr().out
        pool = (max(rows, 2) + 1) * (row_tokens + 1) * per_token  # KVPool's keys and values, counted by hand
        if pool > room:
            assert rows == 1 and "the update alone may not fit" in said, (k, rows, said)
        else:  # the most rows that fit
            assert (max(rows + 1, 2) + 1) * (row_tokens + 1) * per_token > room, (k, rows)
    assert rows == 38  # 40 plain rows: 39 pool rows with their extra column, one of them the spare


def test_kv_room_is_the_memory_plans_formula_worked_by_hand():
    """kv_room, worked by hand (README: memory plan): free less the 5 GiB reserve, AdamW's moments (8 B a trainable
    weight, per shard, unless made) and the larger of the update's part (fp32 gradients, 4 B a trainable weight per
    shard unless made, plus a micro-batch's activations beside a --compile pool) and sampling's (a prefill's peak,
    plus under FSDP the gathered bf16 weights, 2 B a weight). The rollout tests replace kv_room or pass its ends with a
    margin, so ignoring adam_made (a resume's moments counted twice) passed every test."""
    free = ares.RESERVE_GIB * 2 ** 30 + 1000
    cases = [  # (trainable, params, shard, activations, pool, adam_made, grads_made, prefill) -> room
        ((10, 100, 1, 70, False, False, False, 50), 1000 - 80 - 50),  # max(40, 50): the prefill
        ((10, 100, 1, 70, False, True, False, 50), 1000 - 0 - 50),  # the moments made
        ((10, 100, 1, 70, True, False, False, 50), 1000 - 80 - (40 + 70)),  # a pool: the activations beside it
        ((10, 100, 1, 70, True, False, True, 50), 1000 - 80 - 70),  # gradients made (DDP's buckets)
        ((10, 100, 2, 70, True, False, False, 50), 1000 - 40 - (200 + 50)),  # FSDP: 2 shards, the gathered weights
    ]
    for (trainable, params, shard, acts, pool, adam_made, grads_made, prefill), room in cases:
        assert ares.kv_room(free, trainable, params, shard, acts, pool, adam_made, grads_made, prefill) == room, room


def test_pool_bytes_is_what_a_kv_pool_allocates():
    """pool_bytes, which the update's own room (rollout_memory's warning) and bench.py --plan's compile rows subtract,
    against the tensors a KVPool allocates at its first write (a stand-in cache: 3 layers, 2 KV heads, head dim 4,
    bf16): its rows, at least 2, and a spare one, each of length + 1 columns. The test above counts the pool by hand
    beside pool_rows, so pool_bytes losing the spare row or the two-row floor passed every test."""
    layers, heads, dim, length = 3, 2, 4, 10
    per_token = 2 * layers * heads * dim * 2  # keys and values of one token, bf16
    kv = torch.zeros(1, heads, 3, dim, dtype=torch.bfloat16)  # one prompt of 3 tokens
    cache = SimpleNamespace(layers=[SimpleNamespace(keys=kv, values=kv)] * layers)
    for rows in (1, 2, 5):
        pool = ares.KVPool(rows, length, compile=False)
        pool.write(cache, torch.ones(1, 3, dtype=torch.long), 0, 1)
        held = sum(t.numel() * t.element_size() for t in pool.keys + pool.values)
        assert held == {1: 3, 2: 3, 5: 6}[rows] * (length + 1) * per_token  # rows (2 at least) + 1, by hand
        assert ares.pool_bytes(rows, per_token, length) == held, rows


def test_rollout_batch_auto_leaves_room_for_a_branch_calls_prefill_beside_a_full_kv_cache(tiny, monkeypatch, capsys):
    """Eager sampling: a branch call's KV cache can fill every row --rollout-batch auto gives it (prefixes of nearly a
    whole response, small budgets: sampler_calls' room), and its prefill forward runs beside it: a part of up to
    --micro-batch-size full rows, whose own keys and values, a layer's MLP temporaries (3 intermediate-wide values a
    token beside 4 hidden-wide ones) and SDPA's (rows, 1, L, L) mask (bool, and a bf16 copy on a GPU) come on top. The
    rows leave that peak, counted here from the config, beside RESERVE_GIB: k rows' KV + the peak free -> k rows.
    Before, only the 5 GiB reserve covered it (about 3.5 GiB for 3B at --micro-batch-size 1, 14 GiB at 4)."""
    model = tiny[0]
    cfg = ares.resolve_stage_defaults(ares.Config(stage="aepo", model="tiny", data="x", batch_size=64,
                                                  micro_batch_size=2), "aepo")
    text = model.config.get_text_config()
    L = cfg.max_prompt_len + cfg.max_response_len  # a full row
    row = L * ares.kv_bytes_per_token(text, torch.bfloat16)  # a GPU's compute dtype
    part = cfg.micro_batch_size * L  # tokens of one prefill forward
    mlp = part * 2 * (3 * text.intermediate_size + 4 * text.hidden_size)
    mask = cfg.micro_batch_size * L * L * (1 + 2)
    peak = cfg.micro_batch_size * row + mlp + mask
    for k, short in ((1, 0), (5, 0), (40, 0), (5, 1), (40, 1)):  # a byte short of k rows: k - 1 (the peak whole)
        free = ares.RESERVE_GIB * 2 ** 30 + 8 * 1000 + peak + k * row - short  # AdamW's moments not made yet
        monkeypatch.setattr(ares, "free_memory", lambda device: free)
        run = SimpleNamespace(hf=model, n_trainable=1000, n_params=1000, opt=SimpleNamespace(state={}), model=None,
                              state={})
        assert ares.rollout_memory(dataclasses.replace(cfg, rollout_batch="auto"), run, torch.device("cuda")) is None
        assert run.state["rollout_batch"] == k - short, (k, short, run.state, capsys.readouterr().out)


def test_plain_grpo_baseline_uses_one_beta_and_no_controller(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """The demo's GRPO (--kl-mode fixed): every loss token weighs its KL by beta0 (no bucket multiplier, no window
    relaxation), and kappa never moves; the dynamic run of the test above moves it."""
    seen = []
    loss = ares.aepo_loss
    monkeypatch.setattr(ares, "aepo_loss", lambda *a, **kw: seen.append(a[4][a[5].bool()]) or loss(*a, **kw))
    out = tmp_path / "grpo"
    ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 2, "--keep-uniform-groups", "--kl-mode", "fixed",
                        "--kl-coef", "0.02", "--window", 2, "--entropy-quantile", 0.5))
    weights = torch.cat(seen)
    assert len(weights) > 0 and (weights == 0.02).all()
    assert torch.equal(saved_state(out / "final")["kappa"], torch.ones(3, dtype=torch.float64))
    assert all(r["kappa_easy"] == r["kappa_medium"] == r["kappa_hard"] == 1.0 for r in read_jsonl(out / "metrics.jsonl"))


DRIVER = '''
"""torchrun worker: the same AEPO run with DDP, then with FSDP2, each rank dumping its final parameters and state.
Grading is replaced by a fixed pattern so that rank 0's group is always mixed while rank 1's is all wrong on odd
steps (filtered: that rank has nothing to train on but must still join every collective)."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[1])
import ares
import data_prep  # its score_responses calls the grader

out, G = Path(sys.argv[2]), 4
save, calls = ares.save_checkpoint, [0]


def graded(pred, answer):
    k, rank = calls[0], dist.get_rank()
    calls[0] += 1
    group, pos = divmod(k, G)
    return pos % 2 == 0 and (rank == 0 or group % 2 == 1)


def dump_then_save(path, name, policy, opt, sched, processor, state, keep_last):
    if name == "final":  # every rank gets here: full_tensor() is a collective under FSDP
        params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                  for n, p in policy.named_parameters()}
        torch.save(dict(params=params, state=state), path / f"rank{dist.get_rank()}.pt")
    return save(path, name, policy, opt, sched, processor, state, keep_last)


data_prep.grade_batch = lambda preds, answers, *limits: [graded(p, a) for p, a in zip(preds, answers)]  # in order
ares.save_checkpoint = dump_then_save
pool_calls, start = [0], ares.KVPool.start
ares.KVPool.start = lambda self, *a: pool_calls.__setitem__(0, pool_calls[0] + 1) or start(self, *a)
for name, extra in (("ddp", []), ("fsdp", ["--fsdp"]),  # three runs in one process: ares.main (the command line's
                    ("fsdp_compile", ["--fsdp", "--compile", "--compile-backend", "aot_eager"])):
    calls[0] = pool_calls[0] = 0  # entry, one per process) would close the group between them, and a new one can hang
    ares.train_aepo(ares.parse_config(sys.argv[3:] + ["--out", str(out / name)] + extra))  # on re-creation
    (out / name / f"pool_calls{dist.get_rank()}").write_text(str(pool_calls[0]))
dist.destroy_process_group()
'''


def test_aepo_under_torchrun_ddp_and_fsdp_keeps_ranks_identical(tiny_ckpt, demo_data, tmp_path):
    from transformers import AutoModelForImageTextToText

    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    args = aepo_args(demo_data["rl"], None, tiny_ckpt, "--steps", 3, "--minibatches", 2, "--micro-batch-size", 2,
                     "--window", 2, "--entropy-quantile", 0.5)
    run_script([driver, ROOT, tmp_path, *args], nproc=2)
    final = {}
    for name in ("ddp", "fsdp", "fsdp_compile"):  # README (compile): under --fsdp the KV pool runs uncompiled
        out = tmp_path / name
        assert [int((out / f"pool_calls{r}").read_text()) > 0 for r in (0, 1)] == [name == "fsdp_compile"] * 2
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
        for k, v in ranks[0]["params"].items():
            assert torch.equal(v, ranks[1]["params"][k]), f"{name}: {k} differs between ranks"
        s0, s1 = ranks[0]["state"], ranks[1]["state"]
        assert s0["step"] == s1["step"] == 3
        assert s0["tau_history"] == s1["tau_history"]  # tau is global
        assert torch.equal(s0["targets"].nan_to_num(-1), s1["targets"].nan_to_num(-1))
        assert torch.equal(s0["kappa"], s1["kappa"])
        rows = read_jsonl(out / "metrics.jsonl")
        assert [r["groups_kept"] for r in rows] == [1, 2, 1] and all(r["groups"] == 2 for r in rows)
        assert [r.get("graphs_compiled") for r in rows] == [0 if name == "fsdp_compile" else None] * 3
        saved = dict(AutoModelForImageTextToText.from_pretrained(out / "final").named_parameters())
        for k, v in ranks[0]["params"].items():  # what rank 0 wrote is what the ranks hold
            assert torch.equal(saved[k.removeprefix("hf.")], v), f"{name}: saved {k} differs"
        saved = checkpoint_params(out / "final")
        start = checkpoint_params(tiny_ckpt)
        assert any(not torch.equal(start[k], saved[k]) for k in start)
        final[name] = saved
    # The same run sharded or replicated: fp32 on CPU, only the order of the gradient reductions differs. AdamW
    # divides each gradient by its running RMS, so an element whose gradient is as small as that rounding (the
    # embedding rows of tokens the batch hardly uses) moves up to lr an update either way: compare each tensor's
    # update as a whole (a rank out of sync or a shard not stepped is off by O(1)), and almost every element alone.
    start = checkpoint_params(tiny_ckpt)
    for k in final["ddp"]:
        fsdp, ddp = final["fsdp"][k], final["ddp"][k]
        assert (fsdp - ddp).norm() <= 2e-2 * (ddp - start[k]).norm(), k
        assert torch.isclose(fsdp, ddp, atol=1e-5, rtol=1e-4).double().mean() >= 0.99, k


def test_resume_gives_the_parameters_and_controller_state_of_an_uninterrupted_run(tiny_ckpt, demo_data, tmp_path,
                                                                                  monkeypatch):
    common = ["--steps", 4, "--keep-uniform-groups", "--minibatches", 2, "--window", 2, "--entropy-quantile", 0.5]
    ares.main(aepo_args(demo_data["rl"], tmp_path / "straight", tiny_ckpt, *common))
    out = tmp_path / "interrupted"
    run_until_first_step_save(monkeypatch, lambda: ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, *common, "--save-every", 2)))
    shutil.copytree(out / "step_000002", out / "step_000003.tmp")  # a kill mid-save: never resumed from
    (out / "step_000003.tmp" / "COMPLETE").write_text(json.dumps({"step": 3, "time": 0}))
    ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, *common, "--save-every", 2, "--resume"))

    a, b = checkpoint_params(tmp_path / "straight" / "final"), checkpoint_params(out / "final")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = saved_state(tmp_path / "straight" / "final"), saved_state(out / "final")
    assert sa["step"] == sb["step"] == 4 and len(sa["tau_history"]) == 4
    assert sa["tau_history"] == sb["tau_history"]
    assert torch.equal(sa["targets"].nan_to_num(-1), sb["targets"].nan_to_num(-1))
    assert torch.equal(sa["kappa"], sb["kappa"]) and not torch.equal(sa["kappa"], torch.ones(3, dtype=torch.float64))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (out / "step_000003.tmp").exists()  # deleted by the resume (--save-every 2 never writes that name again)


def test_resume_samples_in_the_rollout_batch_the_run_started_with(tiny_ckpt, demo_data, tmp_path, monkeypatch, capsys):
    """--rollout-batch auto is resolved from the device's free memory, which differs at a resume (other processes,
    AdamW's moments already allocated). A step's draws depend on how its rows are split into sampler calls, so a
    resume that resolved it anew sampled other responses than the run it continues. Here the device had room for 1
    row a call at the start and for a whole step's 4 at the resume: the resumed run must still end on the weights and
    logged rewards of a straight run with 1 row a call."""
    common = ["--steps", 2, "--save-every", 1, "--lr", "1e-3", "--keep-uniform-groups"]
    with monkeypatch.context() as m:
        m.setattr(ares, "kv_room", lambda *a, **k: 0)  # no room: 1 row a call
        ares.main(aepo_args(demo_data["rl"], tmp_path / "straight", tiny_ckpt, *common))
        out = tmp_path / "interrupted"
        run_until_first_step_save(monkeypatch, lambda: ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, *common)))
    capsys.readouterr()
    ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, *common, "--resume"))
    assert [r["reward"] for r in read_jsonl(out / "metrics.jsonl")] == \
           [r["reward"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]
    a, b = checkpoint_params(tmp_path / "straight" / "final"), checkpoint_params(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "--rollout-batch auto: 1 rows per rank, as the run started with" in capsys.readouterr().out


def test_all_filtered_and_all_truncated_batches_skip_the_update_with_a_reason(tiny_ckpt, demo_data, tmp_path):
    out = tmp_path / "run"
    ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 2, "--max-response-len", 3))
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 2
    for r in rows:
        assert r["truncated"] == 1.0 and r["groups_kept"] == 0 and r["acc"] == 0
        assert "filtered" in r["skipped_reason"]
    start, end = checkpoint_params(tiny_ckpt), checkpoint_params(out / "final")
    assert all(torch.equal(start[k], end[k]) for k in start)
    assert saved_state(out / "final")["step"] == 2


def test_the_papers_reward_filter_keeps_all_wrong_groups_that_the_shaping_moves(tiny_ckpt, demo_data, tmp_path):
    """Every response truncated, so every group is all wrong: --group-filter reward keeps them under the hierarchical
    reward (each wrong answer's exploration bonus is at least sig(0) * alpha * u = 0.12 > 0.01, README: entropy
    reward) and drops them under R = acc (mean 0), as the accuracy filter does."""
    for shaping, kept in (("hierarchical", 2), ("none", 0)):
        out = tmp_path / shaping
        ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 2, "--max-response-len", 3, "--group-filter",
                            "reward", "--entropy-shaping", shaping))
        rows = read_jsonl(out / "metrics.jsonl")
        assert [(r["acc"], r["groups_kept"], r["groups"]) for r in rows] == [(0, kept, 2)] * 2
        assert ("skipped_reason" in rows[0]) == (kept == 0)


def test_empty_responses_do_not_crash_the_loop(tiny, tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """A policy that ends every response at once (only <|im_end|>): skipped when filtered; with
    --keep-uniform-groups the update runs on one-token responses without producing NaNs."""
    real, eot_id = ares.sample_token, tiny[1].tokenizer.convert_tokens_to_ids("<|im_end|>")

    def always_end(logits, temperature, top_p, u):
        tok, _, entropy = real(logits, temperature, top_p, u)
        eot = torch.full_like(tok, eot_id)
        logp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), -1)
        return eot, logp.gather(1, eot[:, None])[:, 0], entropy

    monkeypatch.setattr(ares, "sample_token", always_end)
    for name, extra in (("filtered", []), ("kept", ["--keep-uniform-groups", "--loss-agg", "token-mean"])):
        out = tmp_path / name
        ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 2, *extra))
        rows = read_jsonl(out / "metrics.jsonl")
        assert len(rows) == 2 and all(r["len"] == 1 and r["truncated"] == 0 for r in rows)
        if name == "filtered":
            assert all("filtered" in r["skipped_reason"] for r in rows)
        end = checkpoint_params(out / "final")
        assert all(torch.isfinite(v).all() for v in end.values())
        assert all(v is None or np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_each_step_waits_for_the_device_before_its_clock_is_read(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """On a GPU the optimizer's kernels are still queued when the step's clock is read: a cold-start step and an AEPO
    update wait for them (ares.wait_for_device: a no-op on the CPU, torch.cuda.synchronize on a GPU), once each, so
    that the update's time is not billed to the next step's sampling."""
    seen = []
    monkeypatch.setattr(ares, "wait_for_device", lambda device: seen.append(device.type))
    ares.main(["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(demo_data["sft"]), "--out",
               str(tmp_path / "cold"), "--steps", "2", "--batch-size", "2"])
    assert seen == ["cpu", "cpu"]
    ares.main(aepo_args(demo_data["rl"], tmp_path / "aepo", tiny_ckpt, "--steps", "2", "--keep-uniform-groups"))
    assert seen == ["cpu"] * 4
    monkeypatch.undo()  # the real wait_for_device, with torch.cuda.synchronize spied
    cuda = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: cuda.append(str(device)))
    ares.wait_for_device(torch.device("cpu"))
    ares.wait_for_device(torch.device("cuda", 1))
    assert cuda == ["cuda:1"]


@pytest.mark.parametrize("minibatches, ppo_epochs", [(2, 1), (1, 2)])
def test_the_update_uses_eq1s_weights_the_sampling_policy_as_old_and_feeds_the_controller_kl_outside_windows(
        minibatches, ppo_epochs, tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """One AEPO step, 2 optimizer steps on its batch (2 minibatches, or 2 epochs of one), spied where the loop hands
    its pieces on. Checked against the
    formulas, from what score_groups returned: every token's KL weight is beta0 * b_d * kappa_d * rho^m (Eq. 1; kappa
    = 1 at the first step); the old log-probs of the second optimizer step are the sampler's own (the ratio of Eq. 2
    is pi / pi_old, not 1); and the controller gets, per bucket, the mean over responses of each response's mean k3
    KL outside its HWE windows, measured in the first epoch only (README: choices, KL). Before, passing no window
    mask or one bucket to the weights, a ratio fixed at 1, the KL inside the windows or that of every epoch to the
    controller passed every test."""
    real = dict(tf=ares.teacher_forced, loss=ares.aepo_loss, score=ares.score_groups, ctrl=ares.update_kl_controller)
    parts, calls, seen = [], [], {}

    def teacher_forced(run, device, prompts, ro, rows, G):
        parts.append(list(rows))
        return real["tf"](run, device, prompts, ro, rows, G)

    def aepo_loss(logp, lp_old, lp_ref, adv, kl_w, mask, *args, **kw):
        calls.append((parts[-1], logp.detach().clone(), lp_old.clone(), lp_ref.clone(), kl_w.clone(), mask.bool()))
        return real["loss"](logp, lp_old, lp_ref, adv, kl_w, mask, *args, **kw)

    def score_groups(ro, *args, **kw):
        seen.update(ro=ro, sc=real["score"](ro, *args, **kw))
        return seen["sc"]

    def update_kl_controller(kappa, kl_outside, seen_now, *args, **kw):
        seen.update(kappa=kappa.clone(), kl_outside=kl_outside.clone(), seen_now=seen_now.clone())
        return real["ctrl"](kappa, kl_outside, seen_now, *args, **kw)

    for name, fn in [("teacher_forced", teacher_forced), ("aepo_loss", aepo_loss), ("score_groups", score_groups),
                     ("update_kl_controller", update_kl_controller)]:
        monkeypatch.setattr(ares, name, fn)
    ref, processor = ares.build_tiny(seed=1)  # another reference than the starting policy: the KL is far from 0
    ref.save_pretrained(tmp_path / "ref")
    processor.save_pretrained(tmp_path / "ref")
    ares.main(aepo_args(demo_data["rl"], tmp_path / "run", tiny_ckpt, "--steps", 1, "--minibatches", minibatches,
                        "--ppo-epochs", ppo_epochs, "--lr", 1e-2,
                        "--keep-uniform-groups", "--window", 1, "--entropy-quantile", 0.5, "--kl-coef", 0.05,
                        "--ref-model", tmp_path / "ref"))
    sc, ro = seen["sc"], seen["ro"]
    assert seen["kappa"].tolist() == [1.0, 1.0, 1.0] and len(calls) >= 2
    b, outside, later = {0: 2.0, 1: 1.0, 2: 0.5}, {0: [], 1: [], 2: []}, {0: [], 1: [], 2: []}
    for k, (rows, logp, lp_old, lp_ref, kl_w, mask) in enumerate(calls):
        epoch = k * ppo_epochs // len(calls)  # each epoch makes the same number of calls
        R = kl_w.shape[1]
        for j, row in enumerate(rows):
            d, hwe = int(sc.bucket[row]), sc.hwe[row, :R]
            assert torch.allclose(kl_w[j], 0.05 * b[d] * torch.where(hwe, 0.5, 1.0)), (row, d)
            assert torch.allclose(lp_old[j][mask[j]], ro.logprobs[row, :R][mask[j]], atol=1e-4), row
            delta = (lp_ref[j] - logp[j]).double().clamp(-20, 20)
            kl = (delta.exp() - delta - 1).clamp(max=10)
            if (mask[j] & ~hwe).any():
                (later if epoch else outside)[d].append(kl[mask[j] & ~hwe].mean().item())
    assert any(not torch.allclose(c[1], c[2], atol=1e-5) for c in calls[1:])  # the policy moved: the ratio is not 1
    for d in range(3):
        assert bool(seen["seen_now"][d]) == bool(outside[d])
        if outside[d]:
            assert seen["kl_outside"][d].item() == pytest.approx(statistics.mean(outside[d]), rel=1e-4), d
            if later[d]:  # the second epoch's KL differs: the comparison above tells the two apart
                assert statistics.mean(outside[d] + later[d]) != pytest.approx(statistics.mean(outside[d]), rel=1e-3)
    assert any(v > 1e-3 for v in seen["kl_outside"].tolist())  # a KL far from 0: the comparison above means something
