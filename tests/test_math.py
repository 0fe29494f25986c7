"""AEPO's math (ARES_SPEC.md §1 and §3-6) and the grader, each against an independent reference: a plain Python
loop, numpy in float64, or a value worked out by hand from the spec's formulas and written out here."""
import contextlib
import json
import math
import statistics
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

import ares
import data_prep
from conftest import ROOT, run_script

EASY, MEDIUM, HARD = 0, 1, 2


def ragged(lengths, R, seed, scale=3.0):
    """Entropy-like values (N, R) with garbage in the padding (it must never matter) and the (N, R) bool mask."""
    g = torch.Generator().manual_seed(seed)
    H = torch.rand(len(lengths), R, generator=g) * scale
    mask = torch.arange(R)[None] < torch.tensor(lengths)[:, None]
    H = torch.where(mask, H, 100 + 50 * torch.rand(len(lengths), R, generator=g))
    return H, mask


# ----------------------------------------------------------------------------------------------------------
# Token entropy (Eq. 3)


def float64_entropy(logits: np.ndarray, T: float) -> np.ndarray:
    z = logits.astype(np.float64) / T
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_entropy_matches_float64_reference(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 37, 1000, generator=g) * 4
    H = ares.token_entropy(logits, temperature, chunk=16)  # 111 rows: several chunks and a short last one
    assert H.shape == (3, 37) and H.dtype == torch.float32
    np.testing.assert_allclose(H.numpy(), float64_entropy(logits.numpy(), temperature), rtol=1e-5, atol=1e-5)
    # default chunk, bf16 input, a leaf that requires grad: still exact for the bf16 values, and no graph
    lb = logits.to(torch.bfloat16).requires_grad_()
    Hb = ares.token_entropy(lb, temperature)
    assert not Hb.requires_grad
    np.testing.assert_allclose(Hb.numpy(), float64_entropy(lb.detach().float().numpy(), temperature), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_entropy_of_uniform_logits_is_log_vocab(temperature):
    V = 151_936
    for value in (0.0, 7.5):
        H = ares.token_entropy(torch.full((2, 3, V), value), temperature)
        np.testing.assert_allclose(H.numpy(), math.log(V), rtol=1e-6)


MEMORY_SCRIPT = """
import json, math, sys
import numpy as np
import torch
sys.path.insert(0, {root!r})
import ares

def rss(field):  # kB -> bytes, from the kernel's own accounting (tracemalloc does not see torch)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
V, B, T, chunk = 151936, 2, 512, 64  # a (64, V) float32 block is 39 MB: above glibc's 32 MB mmap
                                     # threshold, so freed blocks go back to the OS and RSS tracks live memory
row = torch.randn(V, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
logits = row.expand(B, T, V)  # a stride-0 view: (B, T, V) bf16 logits that cost no memory themselves
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
except OSError:
    pass
before = rss("VmRSS")
H = ares.token_entropy(logits, 1.0, chunk=chunk)
peak = rss("VmHWM")  # high-water mark of the process: if the reset failed, peak - before over-estimates
ref = float(-(lambda lp: (np.exp(lp) * lp).sum())(torch.log_softmax(row.double(), -1).numpy()))
print(json.dumps(dict(extra=peak - before, chunk_bytes=chunk * V * 4, full_bytes=B * T * V * 4,
                      err=float((H.double() - ref).abs().max()), shape=list(H.shape))))
"""


def test_token_entropy_peak_memory_is_a_few_chunks_not_the_full_tensor(tmp_path):
    """151,936-token vocabulary, 2 x 512 positions, chunk 64 (16 chunks). Stated bound: the peak extra memory is
    at most 6 float32 (chunk, V) blocks (233 MB), whatever B x T, which is under 40% of one float32 copy of the
    logits (622 MB). At the default chunk of 1,024 rows the same bound is 3.7 GB (measured: ~4 blocks, 2.5 GB)."""
    script = tmp_path / "entropy_memory.py"
    script.write_text(MEMORY_SCRIPT.format(root=str(ROOT)))
    out = json.loads(run_script([script], timeout=300).stdout.strip().splitlines()[-1])
    assert out["shape"] == [2, 512] and out["err"] < 1e-4  # every row is the same row: one float64 entropy
    bound = 6 * out["chunk_bytes"]
    assert bound < 0.4 * out["full_bytes"]
    assert out["extra"] <= bound, f"peak extra {out['extra'] / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------------------------
# Window entropy (Eq. 4), HWE mask and N_HE


def naive_windows(H, lengths, w):
    """{t: mean of H[i, t..t+w-1]} per response, full windows inside the response only."""
    return [{t: sum(float(H[i, tau]) for tau in range(t, t + w)) / w for t in range(L - w + 1)}
            for i, L in enumerate(lengths)]


LENGTHS = [0, 1, 3, 5, 7, 8, 9, 20, 33]  # includes empty and shorter-than-w responses


@pytest.mark.parametrize("w", [1, 4, 8])
def test_window_entropy_matches_naive_loop(w):
    H, mask = ragged(LENGTHS, 33, seed=w)
    hbar, valid = ares.window_entropy(H, mask, w)
    ref = naive_windows(H, LENGTHS, w)
    for i in range(len(LENGTHS)):
        for t in range(33):
            assert bool(valid[i, t]) == (t in ref[i]), (i, t)
            if t in ref[i]:
                assert float(hbar[i, t]) == pytest.approx(ref[i][t], abs=1e-5), (i, t)  # float32


def test_window_entropy_is_accurate_on_a_16k_token_response():
    R, w = 16384, 4  # README: paper settings: 16k response tokens
    H, mask = ragged([R, R - 5], R, seed=1, scale=3.0)
    hbar, valid = ares.window_entropy(H, mask, w)
    Hd = H.double().numpy()
    for i, L in enumerate([R, R - 5]):
        ref = np.convolve(Hd[i, :L], np.ones(w), "valid") / w  # (L - w + 1,) float64 moving mean
        assert int(valid[i].sum()) == L - w + 1
        np.testing.assert_allclose(hbar[i, :L - w + 1].double().numpy(), ref, rtol=0, atol=2e-5)


def tau_between_windows(ref, quantile=0.7):
    """A threshold halfway between two neighbouring window values, so float32 vs float64 never decides a flag."""
    values = sorted({round(v, 6) for row in ref for v in row.values()})
    k = int(quantile * (len(values) - 1))
    return (values[k] + values[k + 1]) / 2


@pytest.mark.parametrize("w", [1, 4, 8])
def test_hwe_mask_and_n_he_match_naive_loop(w):
    H, mask = ragged(LENGTHS, 33, seed=10 + w)
    g = torch.Generator().manual_seed(w)
    tokens = torch.randint(0, 10, H.shape, generator=g)
    triggers = torch.zeros(10, dtype=torch.bool)
    triggers[[1, 4, 7]] = True
    ref = naive_windows(H, LENGTHS, w)
    tau = tau_between_windows(ref)
    hbar, valid = ares.window_entropy(H, mask, w)
    for trig in (None, triggers):
        m = ares.hwe_mask(hbar, valid, tau, tokens if trig is not None else None, trig)
        for i in range(len(LENGTHS)):
            flagged = {t for t, v in ref[i].items() if v >= tau and (trig is None or int(tokens[i, t]) in (1, 4, 7))}
            assert set(m[i].nonzero().flatten().tolist()) == flagged, (i, trig is not None)
            assert int(m[i].sum()) == len(flagged)  # N_HE(i)


def test_hwe_mask_flags_a_window_exactly_at_tau():
    """Spec §3.1: a token is HWE where its window entropy Hbar >= tau, so a window exactly at tau counts (N_HE), for
    a float tau and for one tau per row; windows below tau and positions without a full window do not. Values are
    exact in float32, so the tie is a real tie."""
    hbar = torch.tensor([[0.5, 1.25, 0.25, 0.5], [0.75, 0.5, 0.5, 2.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    T, F = True, False
    want = [[T, T, F, F], [T, T, T, T]]  # tau 0.5: 0.5 and above, full windows only
    assert ares.hwe_mask(hbar, valid, 0.5).tolist() == want
    assert ares.hwe_mask(hbar.double(), valid, 0.5).tolist() == want
    # one tau per row: row 0 at 1.25 (its maximum: one HWE token), row 1 at 0.75
    assert ares.hwe_mask(hbar, valid, torch.tensor([[1.25], [0.75]], dtype=torch.float64)).tolist() == \
        [[F, T, F, F], [T, F, F, T]]
    assert ares.hwe_mask(hbar, valid, 0.5).sum(1).tolist() == [2, 4]  # N_HE


class WordTokenizer:
    """Stand-in tokenizer: token v decodes to WORDS[v]."""
    WORDS = [" Wait", "wait,", "HOWEVER ", "\n alternatively\n", "Check", "butter", "x", "checking", ""]

    def __len__(self):
        return len(self.WORDS)

    def decode(self, ids):
        return "".join(self.WORDS[i] for i in ids)


def test_trigger_table_matches_decoded_stripped_lowercased_words():
    table = ares.trigger_table(WordTokenizer(), vocab_size=11)  # the model's vocabulary may be padded past the tokenizer
    assert table.tolist() == [True, False, True, True, True, False, False, False, False, False, False]


# ----------------------------------------------------------------------------------------------------------
# Threshold tau (§3.2.1)


@pytest.mark.parametrize("q", [0.95, 0.5])
def test_hwe_threshold_matches_numpy_quantile_then_mean(q):
    lengths = [1, 2, 7, 40, 0, 13]  # the empty response has no quantile and is left out of the mean
    H, mask = ragged(lengths, 40, seed=3)
    per_response = [np.quantile(H[i, :L].double().numpy(), q) for i, L in enumerate(lengths) if L > 0]
    assert ares.hwe_threshold(H, mask, q) == pytest.approx(float(np.mean(per_response)), rel=1e-6)


DIST_TAU_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {root!r})
import ares

rank, world, _ = ares.init_distributed()
g = torch.Generator().manual_seed(0)  # every rank draws the same global batch, then keeps its own rows
lengths = [5, 9, 17, 30, 12, 3, 25, 8]
R = 30
H = torch.rand(len(lengths), R, generator=g)
H[3:] = H[3:] * 4 + 2  # rank 1's responses are far more uncertain: its own tau is far from the global one
rows = [range(0, 3), range(3, 8)][rank]  # uneven split: a mean of per-rank means would be wrong
Rk = max(lengths[i] for i in rows)  # ranks pad to different widths
Hk = H[list(rows), :Rk]
mask = torch.arange(Rk)[None] < torch.tensor([lengths[i] for i in rows])[:, None]
tau = ares.hwe_threshold(Hk, mask, 0.95)
# the bucket means behind the reward targets are global too (App. I, M)
n_he = torch.tensor([[2.0, 4.0, 9.0], [20.0, 30.0, 1.0, 3.0, 5.0]][rank])
bucket = torch.tensor([[0, 0, 2], [2, 2, 1, 1, 1]][rank])
for_reward, new = ares.update_targets(torch.tensor([float("nan"), 10.0, float("nan")], dtype=torch.float64), n_he, bucket)
json.dump(dict(tau=tau, H=H.tolist(), lengths=lengths, for_reward=for_reward.tolist(), new=new.tolist()),
          open(sys.argv[1] + f"/rank{{rank}}.json", "w"))
ares.dist.barrier()  # both ranks are done before either tears the group down: a rank that exits while the other
ares.dist.destroy_process_group()  # still holds the gloo connection can abort at exit under load
"""


def test_hwe_threshold_across_two_ranks_is_the_threshold_of_the_concatenated_batch(tmp_path):
    script = tmp_path / "dist_tau.py"
    script.write_text(DIST_TAU_SCRIPT.format(root=str(ROOT)))
    run_script([script, tmp_path], nproc=2, timeout=300)
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    H, lengths = np.array(outs[0]["H"]), outs[0]["lengths"]
    q = [np.quantile(H[i, :L], 0.95) for i, L in enumerate(lengths)]
    global_tau, rank0_tau, rank1_tau = np.mean(q), np.mean(q[:3]), np.mean(q[3:])
    for out in outs:
        assert out["tau"] == pytest.approx(global_tau, rel=1e-6)
    assert abs(rank0_tau - global_tau) > 0.5 and abs(rank1_tau - global_tau) > 0.5
    assert abs(np.mean([rank0_tau, rank1_tau]) - global_tau) > 0.1  # not a mean of per-rank values either
    # targets: easy first seen -> mean of (2, 4) = 3; medium seen before -> previous 10 for the reward, then
    # 0.9 * 10 + 0.1 * mean(1, 3, 5); hard first seen -> mean of (9, 20, 30)
    for out in outs:
        assert out["for_reward"] == pytest.approx([3.0, 10.0, 59 / 3])
        assert out["new"] == pytest.approx([3.0, 0.9 * 10 + 0.1 * 3.0, 59 / 3])


# ----------------------------------------------------------------------------------------------------------
# Difficulty buckets (App. G)


def test_difficulty_buckets_g8_easy_6_to_8_medium_3_to_5_hard_0_to_2():
    g = torch.Generator().manual_seed(0)
    acc = torch.cat([torch.tensor([1.0] * k + [0.0] * (8 - k))[torch.randperm(8, generator=g)] for k in range(9)])
    bucket = ares.difficulty_buckets(acc, 8)
    expected = [HARD] * 3 + [MEDIUM] * 3 + [EASY] * 3  # k = 0..8 correct
    assert bucket.tolist() == [b for b in expected for _ in range(8)]


@pytest.mark.parametrize("G", [2, 3, 6, 12])
def test_difficulty_buckets_use_exact_thirds(G):
    acc = torch.cat([torch.tensor([1.0] * k + [0.0] * (G - k)) for k in range(G + 1)])
    expected = [EASY if Fraction(k, G) >= Fraction(2, 3) else MEDIUM if Fraction(k, G) >= Fraction(1, 3) else HARD
                for k in range(G + 1)]
    assert ares.difficulty_buckets(acc, G).view(-1, G)[:, 0].tolist() == expected


# ----------------------------------------------------------------------------------------------------------
# Hierarchical entropy reward and targets (App. I, M)


def sig(x, s):
    return 1 / (1 + math.exp(-x / s))


TARGETS = torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64)
# (bucket, acc, N_HE, R) with T = (10, 20, 40), alpha = 0.4, worked out from the spec's table:
#   easy   m = max(1, 0.15*10) = 1.5, k = 2, s = 2,   cap = 0.4,  u = 0.6
#   medium m = max(1, 0.25*20) = 5,   k = 3, s = 2.5, cap = 0.4,  u = 0.8
#   hard   m = max(1, 0.35*40) = 14,  k = 4, s = 3,   cap = 0.48, u = 1.0
HAND_WORKED = [
    (EASY, 1, 10, 1.0),  # Delta = 0 <= m: no penalty
    (EASY, 1, 0, 1.0),  # under the target is never penalised on easy prompts
    (EASY, 1, 12, 1 - (0.5 ** 2 / (2 * 2)) / (1.5 + 2) * 0.4),  # Delta - m = 0.5 <= k: quadratic Huber
    (EASY, 1, 15, 1 - (3.5 - 2 / 2) / (1.5 + 2) * 0.4),  # Delta - m = 3.5 > k: linear Huber
    (EASY, 1, 30, 1 - 0.4),  # (18.5 - 1) / 3.5 * 0.4 = 2.0 > cap
    (EASY, 0, 10, sig(0, 2) * 0.4 * 0.6),  # wrong: sigma(max(Delta - m, 0)) * cap * u
    (EASY, 0, 14, sig(4 - 1.5, 2) * 0.4 * 0.6),
    (MEDIUM, 1, 20, 1.0),
    (MEDIUM, 1, 27, 1 - (2 ** 2 / (2 * 3)) / (5 + 3) * 0.4),  # |Delta| - m = 2 <= k
    (MEDIUM, 1, 11, 1 - (4 - 3 / 2) / (5 + 3) * 0.4),  # |Delta| - m = 4 > k: under the target costs too
    (MEDIUM, 1, 0, 1 - 0.4),  # (15 - 1.5) / 8 * 0.4 = 0.675 > cap
    (MEDIUM, 0, 30, sig(10 - 5, 2.5) * 0.4 * 0.8),
    (MEDIUM, 0, 0, sig(0, 2.5) * 0.4 * 0.8),
    (HARD, 1, 40, 1 + sig(0 + 14, 3) * 0.48),  # Delta >= -m: +sigma(Delta + m) * cap
    (HARD, 1, 26, 1 + sig(-14 + 14, 3) * 0.48),  # Delta = -m exactly: the bonus branch
    (HARD, 1, 60, 1 + sig(20 + 14, 3) * 0.48),
    (HARD, 1, 23, 1 - 0.5 * (3 ** 2 / (2 * 4)) / (14 + 4) * 0.48),  # -Delta - m = 3 <= k
    (HARD, 1, 0, 1 - 0.5 * (26 - 4 / 2) / (14 + 4) * 0.48),  # -Delta - m = 26 > k
    (HARD, 0, 60, sig(20 - 14, 3) * 0.48 * 1.0),
    (HARD, 0, 0, sig(0, 3) * 0.48 * 1.0),
]


def test_hierarchical_reward_matches_hand_worked_values():
    bucket = torch.tensor([c[0] for c in HAND_WORKED])
    acc = torch.tensor([float(c[1]) for c in HAND_WORKED])
    n_he = torch.tensor([float(c[2]) for c in HAND_WORKED])
    R = ares.entropy_shaped_reward(acc, n_he, bucket, TARGETS, "hierarchical", 0.4)
    for case, r in zip(HAND_WORKED, R.tolist()):
        assert r == pytest.approx(case[3], rel=1e-12, abs=1e-12), case


def test_hierarchical_reward_small_targets_use_a_margin_of_one():
    targets = torch.tensor([0.0, 2.0, 0.5], dtype=torch.float64)  # m = max(1, f * max(T, 1)) = 1 for all three
    R = ares.entropy_shaped_reward(torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([4.0, 5.0, 0.0, 3.0]),
                                   torch.tensor([EASY, MEDIUM, HARD, HARD]), targets, "hierarchical", 0.5)
    expected = [1 - (3 - 2 / 2) / (1 + 2) * 0.5,  # easy: Delta - m = 3 > k = 2
                1 - (2 ** 2 / (2 * 3)) / (1 + 3) * 0.5,  # medium: |Delta| - m = 2 <= k = 3
                1 + sig(-0.5 + 1, 3) * 0.6,  # hard: Delta = -0.5 >= -m
                sig(2.5 - 1, 3) * 0.6]  # hard, wrong
    assert R.tolist() == pytest.approx(expected, rel=1e-12)


def test_incorrect_only_and_none_modes():
    bucket = torch.tensor([EASY, EASY, EASY, MEDIUM, MEDIUM, HARD, HARD, HARD])
    acc = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    n_he = torch.tensor([15.0, 5.0, 100.0, 12.0, 60.0, 30.0, 50.0, 0.0])
    R = ares.entropy_shaped_reward(acc, n_he, bucket, TARGETS, "incorrect-only", 0.4)
    expected = [-0.4 * 5 / 10,  # easy: g = max(0, Delta) = 5
                0.0,  # easy, under the target
                1.0,  # correct: untouched
                -0.4 * 8 / 20,  # medium: g = |Delta| = 8
                -0.4 * 1,  # medium: min(1, 40 / 20)
                -0.4 * 10 / 40,  # hard: g = max(0, -Delta) = 10
                0.0,  # hard, over the target
                1.0]
    assert R.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    small = ares.entropy_shaped_reward(torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([EASY]),
                                       torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64), "incorrect-only", 0.4)
    assert small.tolist() == pytest.approx([-0.4])  # divides by max(T, 1): min(1, 1.5 / 1)
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(0, 2, (50,), generator=g).float()
    none = ares.entropy_shaped_reward(acc, torch.randint(0, 300, (50,), generator=g).float(),
                                      torch.randint(0, 3, (50,), generator=g), TARGETS, "none", 0.4)
    assert none.tolist() == acc.tolist()


def test_incorrect_only_charges_only_a_score_of_zero():
    # The main-text form R = acc - 1[acc = 0] alpha min(1, g / max(T, 1)): a fractional --reward-fn score is not wrong.
    targets = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    R = ares.entropy_shaped_reward(torch.tensor([0.5, 0.0, 0.25]), torch.tensor([10.0, 10.0, 0.0]),
                                   torch.tensor([EASY, EASY, HARD]), targets, "incorrect-only", 0.4)
    assert R.tolist() == pytest.approx([0.5, 0.0 - 0.4 * 1, 0.25])  # easy g = 8: min(1, 8 / 2) = 1


def test_targets_use_previous_ema_and_first_sighting_uses_current_mean():
    nan = float("nan")
    targets = torch.tensor([nan, nan, nan], dtype=torch.float64)
    # step 1: easy (2, 4), hard (10, 20, 30), no medium prompt
    for_reward, targets = ares.update_targets(targets, torch.tensor([2.0, 4.0, 10.0, 20.0, 30.0]),
                                              torch.tensor([EASY, EASY, HARD, HARD, HARD]))
    assert for_reward[[0, 2]].tolist() == [3.0, 20.0] and math.isnan(for_reward[1])
    assert targets[[0, 2]].tolist() == [3.0, 20.0] and math.isnan(targets[1])
    # step 2: easy (13) uses last step's 3, medium first seen (6, 8), hard absent keeps 20
    for_reward, targets = ares.update_targets(targets, torch.tensor([13.0, 6.0, 8.0]), torch.tensor([EASY, MEDIUM, MEDIUM]))
    assert for_reward.tolist() == pytest.approx([3.0, 7.0, 20.0])
    assert targets.tolist() == pytest.approx([0.9 * 3 + 0.1 * 13, 7.0, 20.0])
    # step 3: momentum 0.9 again
    for_reward, targets = ares.update_targets(targets, torch.tensor([0.0, 40.0]), torch.tensor([EASY, HARD]))
    assert for_reward.tolist() == pytest.approx([4.0, 7.0, 20.0])
    assert targets.tolist() == pytest.approx([0.9 * 4.0, 7.0, 0.9 * 20 + 0.1 * 40])


N_GRID = torch.arange(0, 1001, dtype=torch.float64)  # N_HE = 0..1000
T_GRID = [0.0, 0.5, 1.0, 3.0, 7.3, 10.0, 37.5, 100.0, 250.0, 499.5, 500.0]


@contextlib.contextmanager
def one_thread():
    """Thousands of tiny ops: a second intra-op thread only adds contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def rewards_on_grid(T: float, alpha: float = 0.4) -> torch.Tensor:
    """(bucket, acc, N_HE) -> R for N_HE = 0..1000, every bucket's target = T: a (3, 2, 1001) tensor."""
    bucket = torch.arange(3).repeat_interleave(2 * len(N_GRID))
    acc = torch.tensor([0.0, 1.0]).repeat_interleave(len(N_GRID)).repeat(3)
    R = ares.entropy_shaped_reward(acc, N_GRID.repeat(6), bucket, torch.full((3,), T, dtype=torch.float64),
                                   "hierarchical", alpha)
    return R.view(3, 2, len(N_GRID))


SHAPE = {0: (0.15, 2, 2.0, 1.0, 0.6), 1: (0.25, 3, 2.5, 1.0, 0.8), 2: (0.35, 4, 3.0, 1.2, 1.0)}  # f, kappa, s, c, u


def spec_reward(bucket: int, acc: int, n_he: float, T: float, alpha: float = 0.4) -> float:
    """The hierarchical reward written out from the spec's table, one response at a time."""
    f, k, s, c, u = SHAPE[bucket]
    m, cap, d = max(1.0, f * max(T, 1.0)), alpha * c, n_he - T
    hub = lambda x: x * x / (2 * k) if x <= k else x - k / 2  # noqa: E731
    if not acc:
        return sig(max(d - m, 0.0), s) * cap * u
    if bucket == 0:
        return 1 - min(cap, hub(max(d - m, 0.0)) / (m + k) * cap)
    if bucket == 1:
        return 1 - min(cap, hub(max(abs(d) - m, 0.0)) / (m + k) * cap)
    return 1 + sig(d + m, s) * cap if d >= -m else 1 - min(cap, 0.5 * hub(-d - m) / (m + k) * cap)


def test_score_groups_joins_buckets_hwe_counts_rewards_format_and_advantages_as_a_hand_loop():
    """The training loop's step from graded rollouts to advantages (score_groups), against a plain loop: each group's
    bucket from its accuracy by exact thirds, each response's N_HE from its entropies against its tau (a window entropy
    equal to tau counts: >=), the reward of the spec's table with the targets from BEFORE the step, the format reward
    at --format-weight, GRPO advantages with the unbiased std, the accuracy filter and the EMA of the targets. Each
    piece is tested alone above; this is what ties them together in the loop (a mutation feeding accuracy in place of
    the shaped reward to the advantages, or swapping easy for hard, passed every other test)."""
    G, hi, lo = 4, 2.0, 0.5
    acc = [1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1]  # easy (3 of 4), hard (1 of 4), all right (easy, filtered)
    entropy = [[lo] * 4, [hi, lo, lo, lo], [hi, 1.0, hi, lo], [hi, hi, lo, lo],  # 1.0 = tau: counted
               [hi, hi, lo, lo], [lo] * 4, [hi, lo, lo, lo], [hi] * 4,
               [hi, lo, lo, lo], [lo, hi, lo, lo], [lo, lo, hi, lo], [lo, lo, lo, hi]]
    texts = ["<think>a</think> \\boxed{1}", "1"] * 6  # format_ok, not
    N = len(acc)
    ro = ares.Rollouts(tokens=torch.arange(N * 4).view(N, 4) % 50 + 10, logprobs=torch.zeros(N, 4),
                       entropy=torch.tensor(entropy), resp_mask=torch.ones(N, 4, dtype=torch.bool),
                       loss_mask=torch.ones(N, 4, dtype=torch.bool), truncated=torch.zeros(N, dtype=torch.bool),
                       parent=torch.full((N,), -1), branch_at=torch.zeros(N, dtype=torch.long), tau=torch.ones(N),
                       texts=texts, acc=torch.tensor(acc, dtype=torch.float))
    before = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)  # T_easy, T_medium, T_hard: each seen before
    cfg = ares.Config(group_size=G, window=1, batch_size=3, format_weight=0.5)
    sc = ares.score_groups(ro, cfg, before)

    n_he = [sum(h >= 1.0 for h in row) for row in entropy]
    assert n_he == [0, 1, 3, 2, 2, 0, 1, 4, 1, 1, 1, 1] and sc.n_he.tolist() == n_he
    bucket = [0 if Fraction(sum(acc[g:g + G]), G) >= Fraction(2, 3) else 1 if Fraction(sum(acc[g:g + G]), G)
              >= Fraction(1, 3) else 2 for g in range(0, N, G) for _ in range(G)]
    assert bucket == [0] * 4 + [2] * 4 + [0] * 4 and sc.bucket.tolist() == bucket
    fmt = [1.0, 0.0] * 6
    R = [spec_reward(b, a, n, before[b].item()) + 0.5 * f for b, a, n, f in zip(bucket, acc, n_he, fmt)]
    assert sc.rewards.tolist() == pytest.approx(R, abs=1e-9)
    adv = []
    for g in range(0, N, G):
        mean, sd = statistics.mean(R[g:g + G]), statistics.stdev(R[g:g + G])
        adv += [(r - mean) / (sd + 1e-6) for r in R[g:g + G]]
    assert sc.adv.tolist() == pytest.approx(adv, abs=1e-5)
    assert sc.keep.tolist() == [True] * 8 + [False] * 4 and sc.groups.tolist() == [2, 3]
    easy = statistics.mean(n_he[0:4] + n_he[8:12])  # every group feeds the targets, the filtered one too
    assert sc.targets.tolist() == pytest.approx([0.9 * 0.5 + 0.1 * easy, 2.0, 0.9 * 3.0 + 0.1 * statistics.mean(n_he[4:8])])


def test_reward_monotonic_easy_correct_never_gains_from_more_n_he_hard_never_loses():
    with one_thread():
        for T in T_GRID:
            R = rewards_on_grid(T)
            easy, hard = R[EASY, 1], R[HARD, 1]
            margin = max(1, 0.15 * max(T, 1))
            assert (easy.diff() <= 0).all(), T
            assert (easy[N_GRID <= T + margin] == 1).all(), T  # no cost up to the margin
            assert (easy[N_GRID > T + margin] < 1).all(), T  # a cost beyond it
            assert (hard.diff() >= 0).all(), T
            assert (R[:, 0].diff() >= 0).all(), T  # a wrong answer is never pushed to explore less


def test_every_correct_response_outranks_every_wrong_one_at_alpha_0_4_not_0_5():
    """§4: alpha < 5/12 keeps every correct response above every wrong one in every bucket, for all N_HE and
    targets in 0..500; the released alpha = 0.5 breaks that for hard prompts."""
    worst = {}
    with one_thread():
        for alpha in (0.4, 0.5):
            for T in torch.arange(0, 500.5, 0.5).tolist():
                R = rewards_on_grid(T, alpha)
                gap = R[:, 1].min(1).values - R[:, 0].max(1).values  # (3,) worst correct minus best wrong
                for b in (EASY, MEDIUM, HARD):
                    worst[alpha, b] = min(worst.get((alpha, b), math.inf), gap[b].item())
    assert all(worst[0.4, b] > 0 for b in (EASY, MEDIUM, HARD)), worst
    assert worst[0.5, EASY] > 0 and worst[0.5, MEDIUM] > 0, worst
    assert worst[0.5, HARD] < 0, worst
    # the hard violation, by hand: T = 500 (m = 175), correct with N_HE = 0 vs wrong with N_HE = 1000
    correct = 1 - 0.5 * (325 - 2) / (175 + 4) * 0.6
    wrong = sig(500 - 175, 3) * 0.6
    assert correct < wrong
    R = rewards_on_grid(500.0, 0.5)
    assert R[HARD, 1, 0].item() == pytest.approx(correct) and R[HARD, 0, -1].item() == pytest.approx(wrong)


# ----------------------------------------------------------------------------------------------------------
# GRPO advantages (Eq. 2)


def test_grpo_advantages_match_python_loop_with_unbiased_std():
    g = torch.Generator().manual_seed(0)
    rewards = torch.cat([torch.rand(24, generator=g) * 2 - 0.5, torch.full((8,), 0.7)])  # last group is uniform
    A = ares.grpo_advantages(rewards, 8)
    ref = []
    for k in range(0, 32, 8):
        group = [float(r) for r in rewards[k:k + 8]]
        mu, sd = statistics.mean(group), statistics.stdev(group)  # stdev: divides by G - 1
        ref += [(r - mu) / (sd + 1e-6) for r in group]
    assert A.tolist() == pytest.approx(ref, rel=1e-9, abs=1e-6)
    assert A[24:].abs().max() < 1e-6


def test_mean_only_advantages_subtract_the_group_mean_and_nothing_else():
    """--adv-norm mean (Dr. GRPO): a hand-worked group of 4. Rewards 1, 1, 1, 0.6 (all right, one charged 0.4) have
    mean 0.9, so A = 0.1, 0.1, 0.1, -0.3; the std form makes the same group 0.5, 0.5, 0.5, -1.5."""
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.6, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    A = ares.grpo_advantages(rewards, 4, std=False)
    assert A.tolist() == pytest.approx([0.1, 0.1, 0.1, -0.3, -0.5, 0.5, -0.5, 0.5], abs=1e-12)
    assert ares.grpo_advantages(rewards, 4)[:4].tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5], abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Dynamic KL (Eq. 1, Alg. 1)


def test_k3_is_nonnegative_zero_when_equal_and_matches_hand_values():
    g = torch.Generator().manual_seed(0)
    logp, logp_ref = -torch.rand(1000, generator=g) * 8, -torch.rand(1000, generator=g) * 8
    assert (ares.k3_kl(logp, logp_ref) >= 0).all()
    assert (ares.k3_kl(logp, logp) == 0).all()
    d = math.log(2)
    k = ares.k3_kl(torch.tensor([0.0, 0.0, 0.0, -3.0]), torch.tensor([d, -d, 50.0, -53.0]))
    expected = [2 - d - 1, 0.5 + d - 1, 10.0, 10.0]  # exp(d) - d - 1; |d| clamped to 20 and kl to at most 10
    assert k.tolist() == pytest.approx(expected, rel=1e-6)


def test_k3_mean_over_samples_is_the_true_kl():
    p = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    q = np.array([0.2, 0.2, 0.2, 0.2, 0.1, 0.1])
    true_kl = float((p * np.log(p / q)).sum())  # KL(pi || pi_ref)
    x = torch.multinomial(torch.tensor(p), 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k = ares.k3_kl(torch.tensor(np.log(p))[x], torch.tensor(np.log(q))[x])
    stderr = k.std().item() / math.sqrt(len(k))
    assert abs(k.mean().item() - true_kl) < 5 * stderr


def test_kl_weights_relax_inside_windows_and_equal_beta0_b_kappa_outside():
    g = torch.Generator().manual_seed(0)
    hwe = torch.rand(6, 9, generator=g) < 0.3
    bucket = torch.tensor([EASY, MEDIUM, HARD, HARD, EASY, MEDIUM])
    kappa = torch.tensor([1.5, 0.7, 2.0], dtype=torch.float64)
    b = {EASY: 2.0, MEDIUM: 1.0, HARD: 0.5}  # Eq. 1, Alg. 1: tight on easy, loose on hard
    for rho in (0.5, 0.2):
        W = ares.kl_weights(hwe, bucket, kappa, 0.01, rho)
        assert W.shape == (6, 9)
        for i in range(6):
            d = int(bucket[i])
            outside = 0.01 * b[d] * float(kappa[d])
            for t in range(9):
                assert float(W[i, t]) == pytest.approx(rho * outside if hwe[i, t] else outside, rel=1e-6)


def test_kl_by_bucket_averages_out_of_window_kl_over_responses_that_have_such_tokens():
    # Two easy responses: one with KL 0.02 on its two tokens outside windows (0.5 inside), one whose every loss-masked
    # token is inside a window (possible with --window 1). The controller's input is the mean over responses of each
    # one's mean KL outside windows: 0.02, not (0.02 + 0) / 2. A medium response has one outside token (0.04) and a
    # padded token outside the loss mask (KL 9, ignored).
    kl = torch.tensor([[0.02, 0.02, 0.5], [0.3, 0.3, 0.0], [0.04, 9.0, 0.0]])
    loss_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    hwe = torch.tensor([[0, 0, 1], [1, 1, 0], [0, 0, 0]])
    sums = ares.kl_by_bucket(kl, loss_mask, hwe, torch.tensor([EASY, EASY, MEDIUM]))
    kl_outside = sums[0] / sums[1].clamp(min=1)
    assert kl_outside.tolist() == pytest.approx([0.02, 0.04, 0.0])
    assert sums[1].tolist() == [1.0, 1.0, 0.0]  # responses counted; the hard bucket is unseen (kappa kept)
    assert sums[2].tolist() == pytest.approx([0.5 + 0.3 + 0.3, 0.0, 0.0]) and sums[3].tolist() == [3.0, 0.0, 0.0]


def test_kl_controller_raises_kappa_above_target_lowers_below_within_bounds():
    kappa = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    seen = torch.tensor([True, True, True])
    new = ares.update_kl_controller(kappa, torch.tensor([0.02, 0.005, 0.01], dtype=torch.float64), seen, 0.01, 0.05)
    assert new.tolist() == pytest.approx([1 + 0.05 * 1, 1 + 0.05 * -0.5, 1.0])  # e = clip(KL / 0.01 - 1, -1, 1)
    new = ares.update_kl_controller(kappa, torch.tensor([5.0, 0.0, 0.03], dtype=torch.float64), seen, 0.01, 0.05)
    assert new.tolist() == pytest.approx([1.05, 0.95, 1.05])  # e clipped to +-1
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        kl = torch.rand(3, generator=g, dtype=torch.float64) * 0.02
        k0 = torch.rand(3, generator=g, dtype=torch.float64) * 5 + 0.1
        k1 = ares.update_kl_controller(k0, kl, seen, 0.01, 0.05)
        assert ((k1 > k0) == (kl > 0.01)).all() and ((k1 < k0) == (kl < 0.01)).all()
    unseen = ares.update_kl_controller(kappa, torch.tensor([5.0, 0.0, 5.0], dtype=torch.float64),
                                       torch.tensor([True, False, False]), 0.01, 0.05)
    assert unseen.tolist() == pytest.approx([1.05, 1.0, 1.0])  # a bucket absent this step keeps its kappa
    hi, lo = torch.tensor([99.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([0.0102, 1.0, 1.0], dtype=torch.float64)
    for _ in range(300):
        hi = ares.update_kl_controller(hi, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), seen)
        lo = ares.update_kl_controller(lo, torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64), seen)
        assert (hi <= 100).all() and (lo >= 0.01).all()
    assert hi.tolist() == pytest.approx([100.0] * 3) and lo.tolist() == pytest.approx([0.01] * 3)


# ----------------------------------------------------------------------------------------------------------
# The AEPO loss (Eq. 2 with the KL of Eq. 1)


def loop_loss(logp, logp_old, logp_ref, adv, kl_w, mask, agg, eps_low=0.2, eps_high=0.3, c=3.0):
    """Token by token: l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), min(l, -c A) if A < 0, + beta * k3."""
    per_response, all_tokens = [], []
    for i in range(logp.shape[0]):
        A = float(adv[i])
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i][t]:
                continue
            r = torch.exp(logp[i, t] - logp_old[i, t])
            r_clip = torch.clamp(r, 1 - eps_low, 1 + eps_high)
            l = torch.maximum(-A * r, -A * r_clip)
            if A < 0:
                l = torch.minimum(l, torch.tensor(-c * A, dtype=l.dtype))
            if logp_ref is not None:
                d = torch.clamp(logp_ref[i, t] - logp[i, t], -20, 20)
                l = l + kl_w[i][t] * torch.clamp(torch.exp(d) - d - 1, max=10)
            terms.append(l)
        per_response.append(sum(terms) / len(terms))
        all_tokens += terms
    return sum(per_response) / len(per_response) if agg == "seq-mean-token-mean" else sum(all_tokens) / len(all_tokens)


def loss_batch(seed=0, N=7, R=9):
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(N, R, generator=g, dtype=torch.float64) * 3
    logp = logp_old + torch.randn(N, R, generator=g, dtype=torch.float64) * 0.6
    logp[0, :3] = logp_old[0, :3] + torch.tensor([1.5, 1.3, -1.0], dtype=torch.float64)  # r > 3 and r < 0.8
    logp_ref = logp_old + torch.randn(N, R, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([-1.2, 0.8, -0.3, 1.5, 0.0, -2.0, 0.4], dtype=torch.float64)[:N]
    kl_w = torch.rand(N, R, generator=g, dtype=torch.float64) * 0.05
    lengths = [9, 4, 7, 1, 6, 9, 3][:N]
    mask = torch.arange(R)[None] < torch.tensor(lengths)[:, None]
    mask[2, :3] = False  # a branch: its loss mask starts where it was branched, not at 0
    return logp, logp_old, logp_ref, adv, kl_w, mask


def test_loss_batch_exercises_every_clip_branch():
    logp, logp_old, _, adv, _, mask = loss_batch()
    r, A = torch.exp(logp - logp_old), adv[:, None].expand_as(logp)
    assert ((A < 0) & (r > 3) & mask).any()  # dual clip binds
    assert ((A < 0) & (r < 0.8) & mask).any() and ((A > 0) & (r > 1.3) & mask).any()  # ordinary clipping
    assert ((A > 0) & (r < 0.8) & mask).any() and ((A < 0) & (r > 1.3) & (r < 3) & mask).any()  # pessimistic side


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("with_ref", [True, False])
def test_aepo_loss_and_gradient_match_per_token_loop(agg, with_ref):
    logp, logp_old, logp_ref, adv, kl_w, mask = loss_batch()
    logp_ref = logp_ref if with_ref else None
    denom = mask.shape[0] if agg == "seq-mean-token-mean" else mask.sum().item()
    x = logp.clone().requires_grad_()
    loss, _ = ares.aepo_loss(x, logp_old, logp_ref, adv, kl_w, mask, agg, denom)
    loss.backward()
    y = logp.clone().requires_grad_()
    ref = loop_loss(y, logp_old, logp_ref, adv, kl_w, mask.tolist(), agg)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), y.grad.numpy(), rtol=1e-9, atol=1e-12)
    assert (x.grad[~mask] == 0).all()


def test_plain_grpo_loss_is_symmetric_clip_without_dual_clip_and_one_beta():
    """The demo's baseline (--clip-high 0.2 --dual-clip 0 --kl-mode fixed): the loop with eps = 0.2 on both sides, no
    dual-clip bound (c = infinity) and beta0 on every token."""
    logp, logp_old, logp_ref, adv, _, mask = loss_batch()
    beta = torch.full(mask.shape, 0.01, dtype=torch.float64)
    x = logp.clone().requires_grad_()
    loss, _ = ares.aepo_loss(x, logp_old, logp_ref, adv, beta, mask, "seq-mean-token-mean", mask.shape[0],
                             clip_low=0.2, clip_high=0.2, dual_clip=0)
    ref = loop_loss(logp, logp_old, logp_ref, adv, beta, mask.tolist(), "seq-mean-token-mean", 0.2, 0.2, c=math.inf)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    with_dual = ares.aepo_loss(x, logp_old, logp_ref, adv, beta, mask, "seq-mean-token-mean", mask.shape[0], 0.2, 0.2, 3.0)
    assert with_dual[0].item() < loss.item()  # the batch has r > 3 with A < 0: the dual clip binds there


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_micro_batches_with_the_global_denominator_sum_to_the_full_batch(agg):
    logp, logp_old, logp_ref, adv, kl_w, mask = loss_batch()
    denom = mask.shape[0] if agg == "seq-mean-token-mean" else mask.sum().item()
    x = logp.clone().requires_grad_()
    full, _ = ares.aepo_loss(x, logp_old, logp_ref, adv, kl_w, mask, agg, denom)
    full.backward()
    y = logp.clone().requires_grad_()
    total = 0.0
    for rows in ([0, 1], [2], [3, 4, 5, 6]):
        width = int(mask[rows].nonzero()[:, 1].max()) + 1  # each micro-batch padded only to its own longest row
        part = [t[rows, :width] for t in (y, logp_old, logp_ref)]
        loss, _ = ares.aepo_loss(part[0], part[1], part[2], adv[rows], kl_w[rows, :width], mask[rows, :width], agg, denom)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full.item(), rel=1e-10)
    np.testing.assert_allclose(y.grad.numpy(), x.grad.numpy(), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Grading: the last \boxed{...} against the answer


GRADING = [
    # equivalent fractions and decimals
    (r"so \boxed{\frac{1}{2}}", "1/2", True),
    (r"\boxed{0.5}", r"\frac12", True),
    (r"\boxed{2/4}", "1/2", True),
    (r"\boxed{\dfrac{3}{6}}", "0.5", True),
    (r"\boxed{\frac{3}{4}}", r"\frac{6}{8}", True),
    (r"\boxed{0.50}", "0.5", True),
    (r"\boxed{.5}", "0.5", True),
    (r"\boxed{3.0}", "3", True),
    (r"\boxed{-\frac{1}{2}}", "-0.5", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{75\%}", r"\frac34", True),
    # LaTeX vs plain
    (r"\boxed{\sqrt{2}}", "sqrt(2)", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\sqrt{3}/2", True),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{\left(1, 2\right)}", "(1,2)", True),
    (r"\boxed{x=2}", "2", True),
    # units
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{5}", r"5\text{ cm}", True),
    (r"\boxed{12\,\text{m}}", "12", True),
    (r"\boxed{30^\circ}", "30", True),
    (r"\boxed{\$5}", "5", True),
    (r"\boxed{5\text{ cm}}", "6", False),
    ("\\boxed{5 cm}", "5", True),
    (r"\boxed{30 degrees}", "30", True),
    (r"\boxed{12 units}", "12", True),
    (r"\boxed{12 square units}", "12", True),
    (r"\boxed{12 \text{ cm}^2}", "12", True),
    (r"\boxed{5 cm^2}", "5", True),  # math-verify alone reads 5 c m^2
    (r"\boxed{6 units^2}", "6", True),
    ("\\boxed{24 m\u00b2}", "24", True),
    (r"\boxed{12 in}", "12", True),  # and 12 i n
    (r"\boxed{16\pi \text{ cm}^2}", r"16\pi", True),
    (r"\boxed{45^\circ}", "45", True),
    (r"\boxed{5}", "5 cm", True),  # a unit in the gold
    (r"\boxed{30}", "30 degrees", True),
    (r"\boxed{12}", r"12 \text{ cm}^2", True),
    (r"\boxed{5 cm}", "50", False),  # the number still counts
    (r"\boxed{50}", "5 cm", False),
    (r"\boxed{5 cm^2}", "25", False),  # a unit's square is not the number's
    (r"\boxed{12 \text{ cm}^2}", "2", False),
    (r"\boxed{12 in}", "1", False),
    (r"\boxed{30 degrees}", "3", False),
    (r"\boxed{5x}", "5", False),  # a variable is no unit
    (r"\boxed{5m}", "5", False),  # nor is a letter glued to the number: math-verify took m, s, t, ... there for units
    (r"\boxed{4t}", "4", False),
    (r"\boxed{4}", "4t", False),  # an answer 4t took 4
    (r"\boxed{2m + 3m}", "5m", True),  # and the factor is still compared as one
    (r"\boxed{5 m}", "5", True),  # after a space, a unit
    (r"\boxed{5min}", "5", True),  # a word glued to the number is still a unit: only a single letter stays a factor
    (r"\boxed{7hours}", "7", True),
    (r"\boxed{5 x^2}", "5", False),
    # multiple choice
    (r"\boxed{(B)}", "B", True),
    (r"\boxed{B.}", "B", True),
    (r"\boxed{b}", "B", True),
    (r"\boxed{\text{B}}", "B", True),
    (r"\boxed{\text{(C)}}", "C", True),
    (r"\boxed{B}", "(B)", True),
    (r"\boxed{C}", "B", False),
    (r"\boxed{D}", r"\text{(B)}", False),
    # sets and intervals
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", True),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", False),
    (r"\boxed{(0,1]}", "(0, 1]", True),
    (r"\boxed{[0,1)}", "(0,1]", False),
    (r"\boxed{[1,2]}", "(1,2)", False),
    (r"\boxed{(-\infty, 2)}", r"(-\infty,2)", True),
    (r"\boxed{(-\infty,0)\cup(1,\infty)}", r"(1,\infty)\cup(-\infty,0)", True),
    # wrong answers
    (r"\boxed{3}", "4", False),
    (r"\boxed{-2}", "2", False),
    (r"\boxed{1/2}", "2", False),
    (r"\boxed{0.51}", "0.5", False),
    (r"\boxed{yes}", "No", False),
    (r"\boxed{\text{Yes}}", "yes", True),
    # several \boxed: the last one counts
    (r"first \boxed{4}, no wait, \boxed{5}", "5", True),
    (r"\boxed{5} hmm, actually \boxed{4}", "5", False),
    (r"Thus the answer is $\boxed{5}$.", "5", True),
    (r"\fbox{7}", "7", True),
    # missing, empty or broken \boxed; nested braces; garbage
    ("the answer is 5", "5", False),
    ("", "5", False),
    (r"\boxed{}", "5", False),
    (r"\boxed{5", "5", False),
    (r"\boxed{{1}}", "1", True),
    ("}{}{\\boxed{{{{", "1", False),
    ("\\boxed{\x00\xff\u2603}", "1", False),
    (r"\boxed{\frac{1}{0}}", "1", False),
    (r"\boxed{1e1000}", "1", False),
]


def grade(text, answer):
    return data_prep.is_correct(data_prep.extract_boxed(text), answer)


@pytest.mark.parametrize("text,answer,verdict", GRADING)
def test_grading_table(text, answer, verdict):
    assert grade(text, answer) is verdict


def test_grading_table_covers_at_least_40_cases():
    assert len(GRADING) >= 40 and {v for _, _, v in GRADING} == {True, False}


# What a careful reader grades right or wrong, by hand, where the record holds more than its answer (data_prep.Gold):
# a multiple-choice record's options (MathVista: the right answer is option B, "8/11"; yes / no questions), MathVerse's
# options that live only in its question text (no options in the record: only the letter can be read), MathVista's
# `precision` (its own scorer rounds a decimal prediction to it), and math written in Unicode.
MV = ("3/11", "8/11", "6/11", "3/5")
YES_NO = ("Yes", "No")
ANGLES = ("30\u00b0", "45\u00b0", "60\u00b0", "90\u00b0")
GOLD_GRADING = [
    (r"\boxed{B}", ("B", MV), True),
    (r"\boxed{B. 8/11}", ("B", MV), True),  # the letter, then the option's text
    (r"\boxed{(B) 8/11}", ("B", MV), True),
    (r"\boxed{B: \frac{8}{11}}", ("B", MV), True),
    (r"\boxed{\text{(B) } \frac{8}{11}}", ("B", MV), True),
    (r"\boxed{Option B}", ("B", MV), True),
    (r"\boxed{\mathbf{B}}", ("B", MV), True),
    (r"\boxed{8/11}", ("B", MV), True),  # the option's text alone
    (r"\boxed{\frac{8}{11}}", ("B", MV), True),  # its value
    (r"\boxed{0.7273}", ("B", MV), False),  # a rounded value is no option
    (r"\boxed{3/11}", ("B", MV), False),  # another option's text
    (r"\boxed{\frac{6}{11}}", ("B", MV), False),  # another option's value
    (r"\boxed{A. 8/11}", ("B", MV), False),  # the letter said is the answer given
    (r"\boxed{A}", ("B", MV), False),
    (r"\boxed{No}", ("B", YES_NO), True),
    (r"\boxed{no}", ("B", YES_NO), True),
    (r"\boxed{\text{No}}", ("B", YES_NO), True),
    (r"\boxed{Yes}", ("B", YES_NO), False),
    (r"\boxed{B:45^\circ}", ("B",), True),  # MathVerse writes its options "B:45°"
    ("\\boxed{B\uff1a45\u00b0}", ("B",), True),  # a fullwidth colon
    ("\\boxed{B. 45\u00b0}", ("B",), True),
    (r"\boxed{C: 60^\circ}", ("B",), False),
    (r"\boxed{A, B}", ("B",), False),  # two letters
    (r"\boxed{45^\circ}", ("B",), False),  # the value, but the record does not know the options
    # MathVerse's options live in its question ("Choices:\nA:30°\nB:45°..."): gold_of reads them, then the value is right
    ("\\boxed{45\u00b0}", ("B", ANGLES), True),
    (r"\boxed{45^\circ}", ("B", ANGLES), True),
    (r"\boxed{45}", ("B", ANGLES), True),
    ("\\boxed{B:45\u00b0}", ("B", ANGLES), True),
    ("\\boxed{30\u00b0}", ("B", ANGLES), False),  # another option's value
    (r"\boxed{60}", ("B", ANGLES), False),
    (r"\boxed{44}", ("B", ANGLES), False),
    ("\\boxed{C:45\u00b0}", ("B", ANGLES), False),  # the letter said is the answer given
    (r"\boxed{1.23}", ("1.2", (), 1), True),  # rounded to one decimal: 1.2
    (r"\boxed{1.26}", ("1.3", (), 1), True),
    (r"\boxed{1.27}", ("1.2", (), 1), False),
    (r"\boxed{0.333}", ("0.33", (), 2), True),
    (r"\boxed{2}", ("2.0", (), 1), True),
    (r"\boxed{1.23}", ("1.2",), False),  # without a precision the answer is exact
    # a precision also takes an exact value, or one with more decimals, that rounds to the answer (geometry3k's
    # decimals are rounded option values: convert gives them a precision of their own decimals)
    (r"\boxed{\frac{12}{5}}", ("2.4", (), 1), True),
    (r"\boxed{15.59}", ("15.6", (), 1), True),
    (r"\boxed{\frac{78}{5}}", ("15.6", (), 1), True),
    (r"\boxed{\sqrt{6}}", ("2.4", (), 1), True),  # 2.449...
    (r"\boxed{2\sqrt{6}}", ("4.9", (), 1), True),  # 4.898...
    (r"\boxed{5\pi}", ("15.7", (), 1), True),  # 15.707...
    (r"\boxed{x = \sqrt{6}}", ("2.4", (), 1), True),
    (r"\boxed{15.59 \text{ cm}}", ("15.6", (), 1), True),
    (r"\boxed{1.499}", ("1.50", (), 2), True),
    (r"\boxed{15.5}", ("15.6", (), 1), False),  # another tenth
    (r"\boxed{15.66}", ("15.6", (), 1), False),  # rounds to 15.7
    (r"\boxed{16}", ("15.6", (), 1), False),
    (r"\boxed{156}", ("15.6", (), 1), False),
    (r"\boxed{15.6}", ("15.59", (), 2), False),  # fewer decimals than asked for: 15.60
    (r"\boxed{\sqrt{7}}", ("2.4", (), 1), False),  # 2.645...
    (r"\boxed{\sqrt{6}}", ("2.44", (), 2), False),  # 2.449...: 2.45 at two decimals
    (r"\boxed{x}", ("2.4", (), 1), False),
    (r"\boxed{2.4i}", ("2.4", (), 1), False),
    (r"\boxed{\{2.4, 3\}}", ("2.4", (), 1), False),
    (r"\boxed{\sqrt{6}}", ("2.4",), False),  # without a precision a decimal is exact: 0.51 is not 0.5
    (r"\boxed{2.44}", ("A", ("2.4", "2.5"), 1), False),  # an option's value is met exactly, not rounded
    ("\\boxed{30\u00b0}", ("30",), True),  # Unicode math: degrees, roots, pi, infinity, minus, a full stop
    (r"\boxed{30}", ("30\u00b0",), True),
    (r"\boxed{30^\circ}", ("30\u00b0",), True),
    ("\\boxed{31\u00b0}", ("30",), False),
    ("\\boxed{\u221a3}", (r"\sqrt{3}",), True),
    ("\\boxed{2\u221a3}", (r"2\sqrt{3}",), True),
    ("\\boxed{2\u221a3}", (r"\sqrt{3}",), False),
    ("\\boxed{\u03c0/6}", (r"\frac{\pi}{6}",), True),
    ("\\boxed{(-\u221e, 2]}", (r"(-\infty, 2]",), True),
    ("\\boxed{\u22123}", ("-3",), True),
    ("\\boxed{\u22123}", ("3",), False),
    ("\\boxed{5\u3002}", ("5",), True),
    ("\\boxed{\u221a(3)}", (r"\sqrt{3}",), True),
    ("\\boxed{\u221a(x+1)}", (r"\sqrt{x+1}",), True),
    # vulgar fractions, and a whole number before one is a mixed number (a sum), never a product
    ("\\boxed{\u00bd}", ("1/2",), True),
    ("\\boxed{\u00bd}", ("0.5",), True),
    ("\\boxed{\u00be}", (r"\frac{3}{4}",), True),
    ("\\boxed{\u2153}", (r"\frac{1}{3}",), True),
    ("\\boxed{\u2154\u03c0}", (r"\frac{2\pi}{3}",), True),
    ("\\boxed{1\u00bd}", ("1.5",), True),
    ("\\boxed{1 \u00bd}", (r"\frac{3}{2}",), True),
    ("\\boxed{-2\u00be}", ("-2.75",), True),
    (r"\boxed{3/2}", ("1\u00bd",), True),  # in the gold too
    ("\\boxed{1\u00bd}", ("1",), False),  # not the whole number alone
    ("\\boxed{1\u00bd}", ("12",), False),  # nor its digits
    ("\\boxed{1\u00bd}", ("0.5",), False),  # nor 1 * 1/2
    ("\\boxed{\u00bc}", ("1/2",), False),
    ("\\boxed{2\u2153}", ("2.5",), False),
    # a letter said with text is read only when it is one letter, then its option's text: not two answers, not a word
    (r"\boxed{(A) and (C)}", ("A",), False),
    (r"\boxed{(A), (C)}", ("A",), False),
    (r"\boxed{A. and C.}", ("A",), False),
    (r"\boxed{A) x B) y}", ("A",), False),
    (r"\boxed{A.B}", ("A",), False),
    (r"\boxed{A:B}", ("A",), False),
    (r"\boxed{a.m.}", ("A",), False),
    (r"\boxed{e.g. 5}", ("e",), False),
    (r"\boxed{options}", ("S",), False),
    (r"\boxed{(A), (B)}", ("A", ("1", "2")), False),
]


@pytest.mark.parametrize("text,gold,verdict", GOLD_GRADING)
def test_grading_with_the_records_options_precision_and_unicode(text, gold, verdict):
    assert data_prep.is_correct(data_prep.extract_boxed(text), data_prep.Gold(*gold)) is verdict


def test_grader_processes_give_the_verdicts_of_the_main_thread():
    """AEPO grades in grader processes (grade_batch with workers), eval.py in its own thread: the same verdicts on the
    table above, whose option-value and Unicode cases reach sympy."""
    preds = [data_prep.extract_boxed(t) for t, _, _ in GOLD_GRADING]
    golds = [data_prep.Gold(*g) for _, g, _ in GOLD_GRADING]
    assert data_prep.grade_batch(preds, golds, workers=1) == [v for _, _, v in GOLD_GRADING]


def test_a_records_options_and_precision_reach_the_grader():
    """gold_of: the record's options (as text) and an integer precision; a NaN, a bool or a fraction is none."""
    rec = dict(id="1", answer="B", choices=["3/11", 8], precision=2.0)
    assert data_prep.gold_of(rec) == data_prep.Gold("B", ("3/11", "8"), 2)
    for bad in (math.nan, True, 1.5, -1, 16, None, "2"):  # README (data format): ignored, graded exactly
        assert data_prep.gold_of(dict(rec, precision=bad)).precision is None, bad
    assert data_prep.gold_of(dict(id="1", answer=7)) == data_prep.Gold("7")


def test_a_multiple_choice_questions_listed_options_reach_the_grader():
    """A letter answer without `choices` takes the options its question lists after a "Choices:" line (MathVerse's
    query_cot), lettered from A in order; a question without such a list (MathVerse's Vision Only) gives none."""
    mathverse = "Question: As shown, find the angle.\nChoices:\nA:30\u00b0\nB:45\u00b0\nC:60\u00b0\nD:90\u00b0"
    assert data_prep.gold_of(dict(id="1", question=mathverse, answer="B")).choices == ANGLES
    assert data_prep.gold_of(dict(id="1", question="Find x.\nChoices:\n(A) 1\n(B) 2\nWhy?", answer="A")).choices == ("1", "2")
    for question in ("Answer with the option letter in the image.", "Choices:\nA:30\u00b0", "Choices:\nB:1\nC:2",
                     "Choices: A:1 B:2"):
        assert data_prep.gold_of(dict(id="1", question=question, answer="B")).choices == (), question
    assert data_prep.gold_of(dict(id="1", question=mathverse, answer="45")).choices == ()  # not a letter answer
    record = dict(id="1", question=mathverse, answer="B", choices=["1", "2"])
    assert data_prep.gold_of(record).choices == ("1", "2")  # the record's own options first


@pytest.mark.parametrize("workers", [0, 2])
def test_each_response_is_graded_against_its_own_records_answer(workers):
    """score_responses takes G responses per record, record-major: response i is graded against record i // G. With
    the tiny model never right, the loop's accuracy could not show a misalignment (i % records passed every test)."""
    recs = [dict(id="a", answer="3"), dict(id="b", answer="7"), dict(id="c", answer="5")]
    texts = ["\\boxed{3}", "\\boxed{7}", "\\boxed{3}", "\\boxed{7}", "\\boxed{5}", "\\boxed{3}"]  # G = 2
    assert data_prep.score_responses(recs, texts, 2, workers=workers).tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_extract_boxed_takes_the_last_box_with_nested_braces():
    assert data_prep.extract_boxed(r"so \boxed{1} no, \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert data_prep.extract_boxed(r"\boxed{\frac{\sqrt{3}}{2}} and text {}") == r"\frac{\sqrt{3}}{2}"
    assert data_prep.extract_boxed(r"\boxed{ {a}{b} }") == "{a}{b}"
    assert data_prep.extract_boxed("no box") is None and data_prep.extract_boxed(None) is None and data_prep.extract_boxed(123) is None
    assert data_prep.is_correct(None, "5") is False and data_prep.is_correct("  ", "5") is False


LONG = 100_000
PATHOLOGICAL = [
    ("x" * LONG + r"\boxed{3}", "3", True),  # a 100 kB response, answer at the end
    (r"\boxed{1} " * (LONG // 10), "1", True),  # 10,000 boxes
    (r"\boxed{" + "1+" * (LONG // 2) + "1}", "1", False),  # a 100 kB expression
    (r"\boxed{" + "{" * (LONG // 2) + "}" * (LONG // 2) + "}", "1", False),  # 50,000 nested braces
    (r"\boxed{" + "(" * (LONG // 2) + ")" * (LONG // 2) + "}", "1", False),
    (r"\boxed{" + "9" * LONG + "}", "9" * LONG, True),
    (r"\boxed{" + "{" * LONG, "1", False),  # unbalanced
    (r"\boxed{9^{9^{9^{9}}}}", "1", False),  # short, but sympy could spend forever on it
]


@pytest.mark.parametrize("text,answer,verdict", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_grading_is_fast_on_pathological_input(text, answer, verdict):
    start = time.monotonic()
    assert grade(text, answer) is verdict
    assert time.monotonic() - start < 8.0


@pytest.mark.parametrize("text,ok", [
    ("<think>reasoning</think> so \\boxed{3}", True),
    ("  <think>\nstep 1\nstep 2\n</think>\nThe answer is $\\boxed{\\frac{1}{2}}$.", True),
    ("<think>reasoning</think> the answer is 3", False),  # no \boxed
    ("\\boxed{3}", False),  # no <think>
    ("<think>reasoning \\boxed{3}</think>", False),  # the box must come after </think>
    ("<think>reasoning \\boxed{3}", False),  # unclosed think
    ("<think>reasoning</think> \\boxed{3", False),  # unclosed box
    ("Answer first. <think>reasoning</think> \\boxed{3}", False),  # the response starts with <think>
])
def test_format_ok(text, ok):
    assert data_prep.format_ok(text) is ok
