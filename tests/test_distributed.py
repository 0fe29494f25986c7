"""Issue 12: distributed runs that work on GPUs and across nodes.

On a GPU the trainer's one process group must reduce CPU tensors (every global statistic) as well as CUDA ones (the
gradients). This machine has no GPU, so the device map a GPU run initialises is emulated with gloo standing in for
each backend: the map decides which device types the group serves, and a CPU statistic sent to a group that does
not serve the CPU fails exactly as on a GPU ("No backend type associated with device type cpu"). Then a stuck rank
must end the job within --dist-timeout; the README's two-node AEPO command, as two torchrun agents on one machine (two
"nodes"), must train to the weights of one agent running both ranks; and a Ctrl-C under torchrun must stop every rank
with one line, so that a new launch with --resume goes on to those same weights.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp as fsdp
from conftest import ROOT, foreground, run_script, steps_logged
from torch.distributed.distributed_c10d import BackendConfig

import ares
import data_prep


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_gloo_for_every_backend(backend: str) -> str:
    """The same device map ({device type: backend}, as torch parses the string) with gloo in place of each backend:
    "cpu:gloo,cuda:nccl" -> "cpu:gloo,cuda:gloo", and "nccl" (which serves CUDA only) -> "cuda:gloo"."""
    devices = BackendConfig(dist.Backend(backend)).get_device_backend_map()
    return ",".join(f"{d}:gloo" for d in devices if d in ("cpu", "cuda"))


def small_runs(tiny_ckpt, demo_data, out: Path):
    """A cold-start step and an AEPO step (2 updates, with the KL reference) from it: every collective of both loops."""
    cold = ["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(demo_data["sft"]), "--out",
            str(out / "cold"), "--steps", "1", "--batch-size", "2", "--micro-batch-size", "1"]
    aepo = ["--stage", "aepo", "--model", str(out / "cold" / "final"), "--data", str(demo_data["rl"]), "--steps", "1",
            "--batch-size", "2", "--group-size", "4", "--max-response-len", "12", "--minibatches", "2",
            "--keep-uniform-groups", "--log-samples-every", "0"]
    return cold, aepo


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_every_collective_runs_on_the_process_group_a_gpu_run_starts(sharding, tiny_ckpt, demo_data, tmp_path,
                                                                     monkeypatch):
    """Under torchrun (its environment, world size 1) the trainer starts the process group itself, with the device map
    a GPU run uses (BACKENDS['cuda'], gloo standing in for NCCL) and --dist-timeout as its timeout; a cold-start step
    and an AEPO step then run every statistic, DDP/FSDP2 and checkpoint collective through it."""
    starts = []
    real_init = dist.init_process_group

    def init(backend, **kw):
        starts.append((backend, kw["timeout"]))
        return real_init(backend, **kw)

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setitem(ares.BACKENDS, "cpu", with_gloo_for_every_backend(ares.BACKENDS["cuda"]))
    wrapped = []  # README: at world size 1 the policy is still wrapped as on eight GPUs (DDP, or FSDP2 with --fsdp)

    class CountedDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, *args, **kw):
            wrapped.append("ddp")
            super().__init__(*args, **kw)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", CountedDDP)
    shard = fsdp.fully_shard
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: wrapped.append("fsdp") or shard(module, **kw))
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(k, v)
    cold, aepo = small_runs(tiny_ckpt, demo_data, tmp_path)
    extra = ["--fsdp"] if sharding == "fsdp" else []
    for args in (cold + extra, aepo + ["--out", str(tmp_path / "aepo")] + extra):
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        wrapped.clear()
        ares.main(args + ["--dist-timeout", "77"])
        assert not dist.is_initialized()  # closed at the end of the run
        assert set(wrapped) == {sharding}, (args[1], wrapped)
    assert [b for b, _ in starts] == [with_gloo_for_every_backend("cpu:gloo,cuda:nccl")] * 2
    assert all(t == timedelta(seconds=77) for _, t in starts)
    rows = [json.loads(line) for line in open(tmp_path / "aepo" / "metrics.jsonl")]
    assert len(rows) == 1 and rows[0]["groups_kept"] == 2 and "kl" in rows[0]
    assert (tmp_path / "aepo" / "final" / "COMPLETE").exists()


STALL = '''
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
import ares

done = Path(sys.argv[2])
rank, world, device = ares.init_distributed(timeout_s=2)
if rank == 1:  # stuck (a hung kernel, a dead host): never joins the collective
    for _ in range(600):
        if done.exists():
            break
        time.sleep(0.1)
else:
    t0 = time.time()
    try:
        ares.all_reduce(torch.ones(1))
        message = "no error"
    except RuntimeError as e:  # the line run_command stops a stage with (this script calls all_reduce alone)
        message = ares.collective_failure(e, 2) or str(e)
    done.write_text(f"{time.time() - t0}\\n{message}")
os._exit(0)  # the group is broken: no orderly shutdown
'''


def test_a_stalled_rank_ends_the_collective_within_the_timeout_with_a_clear_error(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    run_script([script, ROOT, tmp_path / "done.txt"], nproc=2, timeout=120)
    waited, message = (tmp_path / "done.txt").read_text().split("\n", 1)
    assert 1.5 < float(waited) < 20, waited
    assert message.startswith("rank 0: a collective waited more than --dist-timeout 2 s for another rank"), message


def readme_aepo(tiny_ckpt, demo_data, out: Path, steps: int, *extra) -> list[str]:
    """The README's multi-node command, `ares.py --stage aepo ... --fsdp --grad-checkpointing`, on the tiny model and
    the demo's RL split at small_runs' sizes (2 updates a step, with the KL reference)."""
    return [str(a) for a in (ROOT / "ares.py", "--stage", "aepo", "--model", tiny_ckpt, "--data", demo_data["rl"],
                             "--out", out, "--steps", steps, "--batch-size", "2", "--group-size", "4",
                             "--max-response-len", "12", "--minibatches", "2", "--keep-uniform-groups",
                             "--log-samples-every", "0", "--fsdp", "--grad-checkpointing", *extra)]


def weights_in(folder: Path) -> dict:
    """A saved model's weights (its model.safetensors): a checkpoint's final/, or the tiny model's folder."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    for k in want:
        assert torch.equal(got[k], want[k]), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def one_agent_aepo(tmp_path_factory, tiny_ckpt, demo_data):
    """steps -> the final weights of readme_aepo run straight by one torchrun agent with 2 ranks (`--standalone
    --nproc_per_node=2`): the reference of the two-node and the Ctrl-C tests, run once per step count for both. They
    differ from the tiny model's (AEPO trained), or weights equal to them would prove nothing."""
    runs = {}

    def final(steps: int) -> dict:
        if steps not in runs:
            out = tmp_path_factory.mktemp(f"one_agent_{steps}_steps")
            run_script(readme_aepo(tiny_ckpt, demo_data, out, steps), nproc=2)
            runs[steps] = weights_in(out / "final")
            start = weights_in(tiny_ckpt)  # (without the tied lm_head.weight, which the trainer's export holds too)
            assert any(not torch.equal(w, runs[steps][k]) for k, w in start.items())
        return runs[steps]

    return final


def test_the_readme_two_node_command_as_two_torchrun_agents_trains_like_one_agent(one_agent_aepo, tiny_ckpt,
                                                                                  demo_data, tmp_path):
    """README (multi-node): `torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint <addr>:29500
    ares.py --stage aepo ... --fsdp --grad-checkpointing`, the same on each node. Here that command,
    ares.py itself, as two torchrun agents on 127.0.0.1 with one CPU process each (gloo, 2 AEPO steps): its final
    weights equal, bit for bit, those of one agent running both ranks. Agents that each trained alone (two worlds of
    one) or ranks that saw other data or skipped a collective would end on other weights, or not at all."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port, out = free_port(), tmp_path / "aepo"
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_conf", f"is_host={int(n == 0)}",
         "--local_addr", "127.0.0.1", *readme_aepo(tiny_ckpt, demo_data, out, 2)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    logs = [a.communicate(timeout=600)[0] for a in agents]
    for n, (a, log) in enumerate(zip(agents, logs)):
        assert a.returncode == 0, f"node {n} failed:\n{log[-5000:]}"
    assert "| world 2 |" in "".join(logs), logs  # rank 0's banner: one world of two ranks
    assert_same_weights(weights_in(out / "final"), one_agent_aepo(2), "two agents vs one")


def what_the_ranks_said(output: str) -> list[str]:
    """A torchrun launch's output lines but torchrun's own (its log lines, `W1207 09:55:28.404000 ...`, and the
    traceback of a signal it got, which ends its output: it waits for the ranks first) and progress bars."""
    output = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output.split("Traceback (most recent call last):")[0])
    return [line for line in re.split(r"[\r\n]", output) if line.strip() and not re.match(r"[IWE]\d{4} \d\d:", line)
            and not re.search(r"\d+%\|", line)]


def test_ctrl_c_under_torchrun_stops_every_rank_and_a_new_launch_resumes_exactly(one_agent_aepo, tiny_ckpt, demo_data,
                                                                               tmp_path):
    """README (run folders, Ctrl-C and kills): a Ctrl-C under torchrun reaches torchrun and every rank (a terminal
    sends SIGINT to its foreground process group); rank 0 prints the one line naming the step and the newest
    checkpoint, every rank stops on its own, the checkpoints stay whole, the lock is released, and the same command
    with --resume, a new torchrun launch, continues exactly where it stopped. The README's AEPO command on 2 ranks,
    --save-every 1, interrupted once a step checkpoint is complete; then resumed to one step past that checkpoint
    (AEPO's learning rate is constant, so --steps may grow on --resume) and compared, bit for bit, with a straight run
    of as many steps."""
    out, log = tmp_path / "run", tmp_path / "torchrun.txt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(command + readme_aepo(tiny_ckpt, demo_data, out, 1000, "--save-every", "1"), cwd=ROOT,
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=foreground)
        try:
            deadline = time.monotonic() + 300
            while not out.is_dir() or ares.latest_checkpoint(out) is None:  # a complete step checkpoint
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            before, sent = log.stat().st_size, time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: torchrun and both ranks
            proc.wait(120)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]  # torchrun's own code (1): it reports the signal
    assert took < 20, text[-3000:]  # torchrun kills a rank still running 30 s after it passed the signal on
    ckpt, logged = ares.latest_checkpoint(out), steps_logged(out)
    s = ares.complete_record(ckpt)["step"]
    assert ckpt == out / f"step_{s:06d}" and logged == list(range(1, len(logged) + 1)) and s in logged, logged
    assert f'File "{ROOT / "ares.py"}"' not in text and "KeyboardInterrupt" not in text, text[-3000:]  # no rank's
    # traceback (torchrun's, of the signal it got, names no ares.py line)
    said = what_the_ranks_said(log.read_bytes()[before:].decode())  # after the Ctrl-C
    assert said == [f"interrupted (Ctrl-C) in step {logged[-1] + 1} of {out}: the newest checkpoint is {ckpt} (step "
                    f"{s}); continue from it with the same command and --resume"], said  # rank 0's; nothing from rank 1
    assert not list(out.glob(f"{ares.LOCK}*")), list(out.iterdir())  # released, by the rank that took it
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert folders and all(p.name.startswith("step_") and ares.damage(p) is None for p in folders), folders  # no .tmp

    history = [json.loads(line) for line in open(out / "metrics.jsonl")][:s]  # the steps the checkpoint holds
    res = run_script(readme_aepo(tiny_ckpt, demo_data, out, s + 1, "--save-every", "1", "--resume"), nproc=2)
    assert f"resumed from {ckpt} at step {s}" in res.stdout, res.stdout[-3000:]  # not started over
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, s + 2)) and rows[:s] == history  # each step once, kept as run
    assert_same_weights(weights_in(out / "final"), one_agent_aepo(s + 1), "interrupted and resumed vs straight")


GROUP_CLOSED = '''
"""A launched rank (torchrun's variables, one process) that loads a model, as eval.py and ares.py do: the OS threads
left once run_command has closed the process group."""
import json, os, sys

sys.path.insert(0, sys.argv[1])
import ares

ares.run_command(lambda: ares.load_model(sys.argv[2], ares.Config(), ares.init_distributed()[2]))
print(json.dumps([open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]))
'''


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads from /proc (Linux)")
def test_closing_the_process_group_after_a_model_loaded_stops_gloos_threads(tiny_ckpt, tmp_path):
    """Loading a model imports torch.distributed.nn, whose functions bound the live group as a default argument: the
    group outlived destroy_process_group, and each rank exited with gloo's threads (gloo_tcp_loop, pt_gloo_runloop) and
    sockets still running, where a two-rank eval.py once aborted (exit -6). Read from the OS, not from torch."""
    script = tmp_path / "closed.py"
    script.write_text(GROUP_CLOSED)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, script, ROOT, tiny_ckpt], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    threads = json.loads(res.stdout.strip().splitlines()[-1])
    assert not [t for t in threads if "gloo" in t], threads

FSDP_RESUME = '''
"""torchrun worker, --fsdp on 2 ranks: AEPO straight for 2 steps; then 1 step, and --resume to 2 steps."""
import sys

sys.path.insert(0, sys.argv[1])
import ares

out, args = sys.argv[2], sys.argv[3:]
ares.train_aepo(ares.parse_config(args + ["--steps", "2", "--out", f"{out}/straight"]))
ares.train_aepo(ares.parse_config(args + ["--steps", "1", "--out", f"{out}/resumed"]))
ares.train_aepo(ares.parse_config(args + ["--steps", "2", "--out", f"{out}/resumed", "--resume"]))
ares.dist.destroy_process_group()
'''


def test_fsdp_checkpoint_is_sharded_per_rank_and_resume_is_exact(tiny_ckpt, demo_data, tmp_path):
    """AEPO's learning rate is constant, so 1 step then --resume to 2 must equal 2 straight steps, bit for bit."""
    from safetensors.torch import load_file

    script = tmp_path / "resume.py"
    script.write_text(FSDP_RESUME)
    args = ["--stage", "aepo", "--model", tiny_ckpt, "--data", demo_data["rl"], "--batch-size", "2", "--group-size",
            "4", "--max-response-len", "12", "--minibatches", "2", "--keep-uniform-groups", "--log-samples-every", "0",
            "--fsdp"]
    run_script([script, ROOT, tmp_path, *args], nproc=2)
    shards = sorted(p.name for p in (tmp_path / "straight" / "final" / "state").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() == load_file(str(tiny_ckpt / "model.safetensors")).keys()  # as save_pretrained saves
    # the model itself: the tied lm_head.weight (gathered on 2 ranks, a copy of embed_tokens) is left out
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]


FULL_DISK_ON_RANK_1 = '''
"""torchrun worker: a cold start whose second checkpoint fails on rank 1 alone, as a node-local disk or a quota
would: in its shard of the sharded state (dcp), or as it flushes its RNG file."""
import os
import sys

sys.path.insert(0, sys.argv[1])
from torch.distributed.checkpoint import filesystem

import ares
import data_prep


def fails_on_rank_1(real, tmp):
    def write(*a, **k):
        if os.environ["RANK"] == "1" and tmp.exists():
            raise OSError(28, "No space left on device")
        return real(*a, **k)
    return write


where, tmp = sys.argv[2], ares.Path(sys.argv[sys.argv.index("--out") + 1]) / "step_000002.tmp"
if where == "dcp":
    filesystem._write_item = fails_on_rank_1(filesystem._write_item, tmp)
else:
    data_prep.fsync = fails_on_rank_1(data_prep.fsync, tmp)
ares.main(sys.argv[3:])
'''


@pytest.mark.parametrize("where", ["dcp", "rng"])
def test_a_full_disk_on_one_rank_stops_the_run_with_one_line(where, tiny_ckpt, demo_data, tmp_path):
    """Before: an OSError or CheckpointException traceback from every rank (a BaseException: past every `except
    Exception`), and the half-written step_000002.tmp kept its space. Now one line names the checkpoint, the cause and
    the rank, and the run stops; the checkpoint before it is whole. A dcp write that fails reaches every rank, so
    rank 0 speaks and removes the .tmp; an RNG file is rank 1's own, so rank 1 speaks, leaves the .tmp (rank 0 may
    still be writing there) and says so, and rank 0, waiting at the save's barrier, stops with a line of its own."""
    script, out = tmp_path / "full.py", tmp_path / "run"
    script.write_text(FULL_DISK_ON_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", script, ROOT, where,
           "--stage", "coldstart", "--model", tiny_ckpt, "--data", demo_data["sft"], "--out", out, "--steps", "3",
           "--batch-size", "4", "--micro-batch-size", "2", "--save-every", "1", "--dist-timeout", "600"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([str(a) for a in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    start = f"checkpoint {out / 'step_000002'} could not be written (No space left on device, on rank 1): the run stopped, "
    left = "step_000002.tmp is removed and the checkpoints before it are whole; free the space" if where == "dcp" else \
        f"the checkpoints before it are whole; free the space (delete the half-written {out / 'step_000002.tmp'} too)"
    assert res.stderr.count(start) == 1 and f"{start}{left}, then continue with --resume" in res.stderr, res.stderr[-3000:]
    ours = res.stderr.split("elastic/multiprocessing/api.py")[0]  # before torchrun's own report of the failed ranks
    assert "Traceback" not in ours, ours[-3000:]
    waited = re.escape(f"rank 0 stopped while {out / 'step_000002'} was being written: another rank left or stalled (")
    waited += r"[^)\n]*Connection"  # gloo's words vary: "Connection closed by peer", "Read error [...]: Connection reset"
    assert bool(re.search(waited, ours)) == (where == "rng"), ours[-3000:]  # gloo sees rank 1 leave the barrier at once
    kept = ["step_000001"] + (["step_000002.tmp"] if where == "rng" else [])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == kept
    assert ares.damage(out / "step_000001") is None


STALL_ON_RANK_1 = '''
"""torchrun worker: a cold start whose rank 1 stalls for 30 s before its second optimizer step (a hung data loader, a
swapping host), so rank 0 waits in DDP's gradient all-reduce past --dist-timeout."""
import os
import sys
import time

sys.path.insert(0, sys.argv[1])
import ares

real, steps = ares.optimizer_step, []


def stalls_on_rank_1(*a, **k):
    steps.append(1)
    if os.environ["RANK"] == "1" and len(steps) == 2:
        time.sleep(30)
    return real(*a, **k)


ares.optimizer_step = stalls_on_rank_1
ares.main(sys.argv[2:])
'''


def test_a_stalled_rank_stops_a_torchrun_stage_with_one_line_naming_dist_timeout(tiny_ckpt, demo_data, tmp_path):
    """README (multi-GPU): a rank that hangs ends the job with an error naming --dist-timeout. Through ares.main under
    torchrun, a stall met in DDP's backward (gloo's all-reduce, not ares.all_reduce) printed gloo's raw 'Timed out
    waiting 5000ms' traceback. Now rank 0 stops with one line naming the flag; rank 1, back from its stall, finds rank
    0 gone and says so in one line too."""
    script, out = tmp_path / "stall.py", tmp_path / "run"
    script.write_text(STALL_ON_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", script, ROOT,
           "--stage", "coldstart", "--model", tiny_ckpt, "--data", demo_data["sft"], "--out", out, "--steps", "3",
           "--batch-size", "4", "--micro-batch-size", "2", "--dist-timeout", "5"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([str(a) for a in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    ours = res.stderr.split("elastic/multiprocessing/api.py")[0]  # before torchrun's own report of the failed ranks
    assert "rank 0: a collective waited more than --dist-timeout 5 s for another rank, which died or stalls: the run " \
           "stopped, and the checkpoints before this step are whole; continue with --resume (Timed out waiting" in ours, \
        ours[-3000:]
    assert "Traceback" not in ours, ours[-3000:]



def test_bad_input_under_torchrun_is_one_line_not_one_per_rank(tmp_path, monkeypatch, capsys):
    """Every rank torchrun starts checks the same flags and reads the same data, so a bad flag or record printed the
    same line once per rank (8 times on 8 GPUs). Now local rank 0 says it and the others wait to be stopped. Under
    torchrun: a record missing its id. In this process, for a flag out of range, a flag argparse cannot read and
    eval.py passrate's own check: local rank 0 says it at once; local rank 1 waits, says nothing when torchrun stops
    it meanwhile, and says it itself when nothing does (local rank 0 went on: the line is its own)."""
    import eval as ev

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    aepo = ["--stage", "aepo", "--model", "tiny", "--data", bad, "--out", tmp_path / "run"]
    res = subprocess.run([str(a) for a in [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                           "--standalone", "ares.py", *aepo]],
                         cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=300)
    line = f"data error: {bad}: record #0: missing or empty field 'id'"
    assert res.returncode != 0 and res.stderr.count(line) == 1, res.stderr[-2000:]
    cases = [(ares.main, aepo + ["--lr", "-1"], "--lr must be > 0, got -1.0"),
             (ares.main, aepo + ["--lr", "abc"], "error: argument --lr: invalid float value: 'abc'"),
             (ev.main, ["passrate", "--model", "tiny", "--data", bad, "--out", tmp_path / "r.jsonl", "--k", "0"],
              "--k must be >= 1, got 0")]
    waited = []

    def stopped_by_torchrun(seconds):  # local rank 0 exited meanwhile
        waited.append(seconds)
        raise SystemExit(-15)

    for local_rank, sleep, says in (("0", stopped_by_torchrun, True), ("1", stopped_by_torchrun, False),
                                    ("1", waited.append, True)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setattr(data_prep.time, "sleep", sleep)
        for main, args, line in cases:
            waited.clear()
            with pytest.raises(SystemExit) as e:
                main([str(a) for a in args])
            said = str(e.value.code) + capsys.readouterr().err  # Python prints the one; argparse the other
            assert (line in said) == says and e.value.code != 0, (local_rank, args, said)
            assert waited == ([] if local_rank == "0" else [data_prep.SAY_AFTER_S]), (local_rank, args, waited)
    assert not (tmp_path / "run").exists()

def test_a_line_after_the_process_group_forms_is_each_ranks_own_and_said_at_once(monkeypatch):
    """Only a line met before init_distributed is every rank's alike, so only it makes local rank 1 wait for local rank
    0 to say it; one met after is this rank's own and is said at once, and an exit without a line (a code: --help's 0,
    Ctrl-C's 130) never waits. The torchrun test above stops before the group forms, so waiting everywhere passed it."""
    waited = []
    monkeypatch.setattr(data_prep.time, "sleep", waited.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    for name in ("RANK", "MASTER_ADDR", "WORLD_SIZE"):  # init_distributed at world size 1: no process group to start
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(ares.GROUP, "formed", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # local rank 1 on a one-GPU machine: no cuda:1
    for formed, code, want in ((False, "bad flag", [10.0]), (True, "rank 1's own line", []),  # README: up to 10 s
                               (False, 130, []), (False, 0, [])):
        waited.clear()
        with pytest.raises(SystemExit) as e, ares.one_line_per_node():
            if formed:
                ares.init_distributed()
            raise SystemExit(code)
        assert e.value.code == code and waited == want, (formed, code, waited)


FINGERPRINTS_COUNTED = """
\"\"\"torchrun worker: ares.main with ares.fingerprint counted; each rank writes {"fingerprints": the path flags it
fingerprinted, "exit": how it ended} to <argv[2]>/rank<RANK>.json.\"\"\"
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import ares

calls, real, ended = [], ares.fingerprint, "returned"


def counted(name, value):
    calls.append(name)
    return real(name, value)


ares.fingerprint = counted
try:
    ares.main(sys.argv[3:])
except SystemExit as e:
    ended = e.code
    raise
finally:
    (Path(sys.argv[2]) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(dict(fingerprints=calls, exit=ended)))
"""


def test_rank_0_alone_fingerprints_the_files_and_a_changed_one_stops_every_rank_with_one_line(tiny_ckpt, demo_data,
                                                                                            tmp_path):
    """Every rank hashed each file a path flag names (a data set whole, up to 1 GiB) at every start: 8 ranks on a node
    read it 8 times over. Now rank 0 alone does, once per flag, at a cold start on 2 ranks and at its --resume; with
    --data reordered in place, that resume stops every rank, rank 0 with the one line and rank 1 silently (exit 1),
    none left waiting in a collective, and the run folder is as it was."""
    script, out, data = tmp_path / "counted.py", tmp_path / "run", tmp_path / "sft.jsonl"
    script.write_text(FINGERPRINTS_COUNTED)
    shutil.copy(demo_data["sft"], data)
    (tmp_path / "images").symlink_to(Path(demo_data["sft"]).parent / "images")  # the records' paths are relative
    args = ["--stage", "coldstart", "--model", tiny_ckpt, "--data", data, "--out", out, "--steps", "1",
            "--batch-size", "4", "--micro-batch-size", "2", "--dist-timeout", "60"]
    said = lambda launch: [json.loads((tmp_path / launch / f"rank{r}.json").read_text()) for r in (0, 1)]  # noqa: E731
    (tmp_path / "start").mkdir()
    run_script([script, ROOT, tmp_path / "start", *args], nproc=2)
    assert [r["fingerprints"] for r in said("start")] == [list(ares.PATH_FLAGS), []]
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[1:] + lines[:1]))  # the same records, in another order
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tmp_path / "resume").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", script, ROOT,
           tmp_path / "resume", *args, "--resume"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([str(a) for a in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    line = f"--resume: --data {data} ({data.resolve()}): other contents than when the run started"
    ours = res.stderr.split("elastic/multiprocessing/api.py")[0]  # before torchrun's own report of the failed ranks
    assert ours.count(line) == 1 and "Traceback" not in ours, ours[-3000:]
    rank0, rank1 = said("resume")
    assert rank0["fingerprints"] == list(ares.PATH_FLAGS) and rank1["fingerprints"] == [], (rank0, rank1)
    assert rank0["exit"].startswith(line) and rank1["exit"] == 1, (rank0, rank1)  # each stopped on its own
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


MEMORY = '''
"""torchrun worker: the peak host memory of each rank (VmHWM, reset before each phase) while loading a model with
--fsdp, saving a checkpoint after one optimizer step, and (mode 'resume', a fresh process) resuming from it as the
trainer does (load_for_training given the newest checkpoint); and the whole-model reads (load_model without meta) of
each. A warm-up on the tiny model first imports every module and warms the allocator, so the deltas are the model's."""
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
import torch.distributed.fsdp as fsdp

import ares

mode, model_dir, out = sys.argv[2], sys.argv[3], Path(sys.argv[4])
full_loads = []  # the models this rank read whole: mapped from disk, a read's peak memory does not show them
real_load_model = ares.load_model


def counted_load_model(name, cfg, device, meta=False, processor=None, revision=None):
    if not meta:
        full_loads.append(name)
    return real_load_model(name, cfg, device, meta=meta, processor=processor, revision=revision)


ares.load_model = counted_load_model


def status(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def measured(fn):
    """(result, peak host bytes above the resident set before fn)."""
    gc.collect()
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    result = fn()
    return result, status("VmHWM") - before


def load(model, resume):
    cfg = ares.resolve_stage_defaults(ares.parse_config(
        ["--stage", "aepo", "--model", model, "--data", "x", "--out", str(out / model.replace("/", "_")), "--fsdp",
         "--lr", "1e-3"] + (["--resume"] if resume else [])), "aepo")
    ckpt = ares.latest_checkpoint(Path(cfg.out)) if resume else None  # what the trainer's --resume passes
    run = ares.load_for_training(cfg, torch.device("cpu"), ckpt)
    return ares.prepare_training(cfg, run, torch.device("cpu"), 10)


def step_and_save(run):
    for p in run.params:  # one optimizer step: AdamW's moments exist, as in any real checkpoint
        p.grad = torch.zeros_like(p)
    run.opt.step()
    run.state["step"] = 1
    return measured(lambda: ares.save_checkpoint(run.out, "step_000001", run.policy, run.opt, run.sched,
                                                 run.processor, run.state, 2))[1]


rank, world, device = ares.init_distributed(600)
warm = load("tiny", resume=mode == "resume")
if mode == "fresh":
    step_and_save(warm)
del warm
full_loads.clear()
report = {"model_bytes": None}
run, report["load" if mode == "fresh" else "resume"] = measured(lambda: load(model_dir, resume=mode == "resume"))
if mode == "fresh":
    report["save"] = step_and_save(run)
report["model_bytes"] = sum(p.numel() * 4 for p in run.policy.parameters())  # DTensor numel: the global size
report["full_loads"] = len(full_loads)
(out / f"{mode}_rank{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def mid_size_ckpt(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL widened to 25.7M parameters (103 MB in fp32): large enough to stand out of the noise."""
    out = tmp_path_factory.mktemp("mid")
    sizes = dict(ares.TINY_SIZES)
    try:
        ares.TINY_SIZES.update(hidden=512, layers=8, heads=8, kv_heads=4, ffn=1536)
        model, processor = ares.build_tiny(0)
    finally:
        ares.TINY_SIZES.update(sizes)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_fsdp_load_save_and_resume_never_hold_a_full_copy_per_rank(mid_size_ckpt, tmp_path):
    """Peak host memory per rank (VmHWM), in units of M = the fp32 weights, 2 ranks on the CPU (where every rank's
    shards live in host memory too). Fresh load: rank 0 reads the model once (1 M) and keeps its shard (0.5 M), rank 1
    only its shard; save: rank 0 gathers the weights for the HF export (1 M), never the optimizer (before: every rank
    loaded the whole model, 1.2-1.4 M, and a save gathered weights plus AdamW onto rank 0, 3 M); resume: each rank
    reads only its own shards of weights and AdamW (1.5 M, plus read buffers: before, 4.5 M), and no rank reads the
    whole model (before: rank 0 read the checkpoint's, for fill_shards(), which a resume skips, to drop it unused)."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY)
    for mode in ("fresh", "resume"):
        run_script([script, ROOT, mode, mid_size_ckpt, tmp_path], nproc=2)
    got = {(mode, r): json.loads((tmp_path / f"{mode}_rank{r}.json").read_text()) for mode in ("fresh", "resume")
           for r in (0, 1)}
    M = got["fresh", 0]["model_bytes"]
    assert 1.0e8 < M < 1.1e8
    limits = {("fresh", 0, "load"): 1.5, ("fresh", 1, "load"): 0.5, ("fresh", 0, "save"): 1.0, ("fresh", 1, "save"): 0.0,
              ("resume", 0, "resume"): 1.5, ("resume", 1, "resume"): 1.5}  # what each rank must hold, in M
    for (mode, rank, phase), need in limits.items():
        peak = got[mode, rank][phase] / M
        assert peak < need + 0.35 if phase != "resume" else peak < need + 1.0, f"{phase} on rank {rank}: {peak:.2f} M"
    full_loads = {(mode, r): got[mode, r]["full_loads"] for mode in ("fresh", "resume") for r in (0, 1)}
    assert full_loads == {("fresh", 0): 1, ("fresh", 1): 0, ("resume", 0): 0, ("resume", 1): 0}, full_loads


def test_fsdp_fills_fp32_master_shards_from_a_bf16_checkpoint_read_once(tiny, tmp_path, monkeypatch):
    """The released models are bf16 files: rank 0 reads them as they are, and every rank's fp32 shards (and the rotary
    buffers the meta skeleton lacks) end equal to the file's values. World size 1 under torchrun's environment."""
    import copy

    from transformers import AutoModelForImageTextToText

    model, processor = tiny
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # the session's model stays fp32
    processor.save_pretrained(tmp_path / "bf16")
    reads = []
    real_load = ares.load_model
    monkeypatch.setattr(ares, "load_model", lambda name, cfg, device, meta=False, **kw: reads.append((cfg.dtype, meta))
                        or real_load(name, cfg, device, meta, **kw))
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    cfg = ares.resolve_stage_defaults(ares.parse_config(["--stage", "aepo", "--model", str(tmp_path / "bf16"), "--data",
                                                         "x", "--out", str(tmp_path / "out"), "--fsdp"]), "aepo")
    ares.init_distributed()
    try:
        run = ares.prepare_training(cfg, ares.load_for_training(cfg, torch.device("cpu")), torch.device("cpu"), 1)
        assert reads == [("fp32", True), ("file", False)]  # an empty skeleton, then the file once, as it is
        saved = dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).named_parameters())
        for name, p in run.policy.hf.named_parameters():
            assert p.dtype == torch.float32 and torch.equal(p.full_tensor(), saved[name].float()), name
        for (name, b), (_, want) in zip(run.policy.hf.named_buffers(), model.named_buffers()):
            assert torch.equal(b, want), name  # rotary inverse frequencies, computed at construction
    finally:
        dist.destroy_process_group()


def test_ddp_loads_a_bf16_checkpoint_as_it_is_and_casts_each_weight_to_the_fp32_master(tiny, tmp_path, monkeypatch):
    """Without --fsdp every rank reads the file in its own dtype (bf16 for the released models) and casts the weights
    one by one (README: memory at load and save). World size 1 under torchrun's environment, DDP-wrapped: the policy's
    weights are fp32 and equal to the file's values, each cast on its own (every weight converted in a call of its
    own size, never the model at once), the rotary buffers are the fp32 ones the model computes, and the
    config says fp32, so that a checkpoint saved from it says what it holds."""
    import copy

    from transformers import AutoModelForImageTextToText

    model, processor = tiny
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    processor.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    casts = []  # numel of every tensor cast from bf16 to fp32 while ares casts the loaded weights
    real_to, real_cast = torch.Tensor.to, ares.cast_weights

    def spy(t, *args, **kwargs):
        out = real_to(t, *args, **kwargs)
        if t.dtype == torch.bfloat16 and out.dtype == torch.float32:
            casts.append(t.numel())
        return out

    def cast_weights(*args):
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "to", spy)
            real_cast(*args)

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    cfg = ares.resolve_stage_defaults(ares.parse_config(["--stage", "aepo", "--model", str(tmp_path / "bf16"), "--data",
                                                         "x", "--out", str(tmp_path / "out"), "--dtype", "bf16"]), "aepo")
    ares.init_distributed()
    try:
        monkeypatch.setattr(ares, "cast_weights", cast_weights)
        run = ares.prepare_training(cfg, ares.load_for_training(cfg, torch.device("cpu")), torch.device("cpu"), 1)
        assert isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
        saved = dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).named_parameters())
        assert all(p.dtype == torch.bfloat16 for p in saved.values())
        params = dict(run.hf.named_parameters())
        for name, p in params.items():
            assert p.dtype == torch.float32 and torch.equal(p.detach(), saved[name].float()), name
        assert sorted(casts) == sorted(p.numel() for p in params.values())  # one cast per weight, none of the whole
        buffers, want = dict(run.hf.named_buffers()), dict(model.named_buffers())
        assert buffers.keys() == want.keys() and buffers  # rotary inverse frequencies
        for name, b in buffers.items():
            assert b.dtype == torch.float32 and torch.equal(b, want[name]), name
        configs = [run.hf.config, *(getattr(run.hf.config, k) for k in run.hf.config.sub_configs)]
        assert [c.dtype for c in configs] == [torch.float32] * len(configs)
    finally:
        dist.destroy_process_group()


def test_the_tiny_model_in_bf16_keeps_its_rotary_buffers_in_fp32_as_a_checkpoint_does(tiny_ckpt):
    """--model tiny with --dtype bf16 (the device check's runs, and the KL reference of an AEPO run started from tiny)
    loads as a bf16 checkpoint folder does: bf16 weights, the rotary inverse frequencies in fp32 (before, tiny cast
    them to bf16 too, so its reference turned at other angles than its fp32-master policy), meta skeleton included."""
    cfg, cpu = ares.Config(dtype="bf16"), torch.device("cpu")
    folder = ares.load_model(str(tiny_ckpt), cfg, cpu)[0]
    for meta in (False, True):
        tiny = ares.load_model("tiny", cfg, cpu, meta=meta)[0]
        assert all(p.dtype == torch.bfloat16 for p in tiny.parameters())
        assert [(n, b.dtype) for n, b in tiny.named_buffers()] == [(n, b.dtype) for n, b in folder.named_buffers()]
        assert list(tiny.buffers()) and all(b.dtype == torch.float32 for b in tiny.buffers())
        assert tiny.config.dtype == torch.bfloat16
    want = dict(folder.named_buffers())
    for name, b in ares.load_model("tiny", cfg, cpu)[0].named_buffers():
        assert torch.equal(b, want[name]), name


def test_the_bf16_sampling_copy_is_cast_weight_by_weight_never_a_second_fp32_copy(mid_size_ckpt):
    """A bf16 run on one device (no --fsdp) samples from a bf16 copy of the fp32 policy (sampling_copy). Peak host
    memory (VmHWM, reset before) above the resident set while the copy of the 25.7M-parameter model is made: its
    bf16 weights, 0.5 M (M = the fp32 weights), not an fp32 deep copy first (1 M and more). The copy holds the
    policy's weights cast to bf16, keeps the rotary buffers in fp32 as the trainer's forward does, and keeps the tied
    input and output embeddings one tensor."""
    import gc
    from types import SimpleNamespace

    def status(key: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    cpu = torch.device("cpu")
    hf, _ = ares.load_model(str(mid_size_ckpt), ares.Config(dtype="fp32"), cpu)
    with torch.no_grad():  # resident, as after any optimizer step (loading may leave them mapped from the file)
        for p in hf.parameters():
            p.mul_(1)
    M = sum(p.numel() for p in hf.parameters()) * 4
    gc.collect()
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
    copy = ares.sampling_copy(ares.Config(dtype="bf16"), SimpleNamespace(hf=hf), cpu)
    peak = (status("VmHWM") - before) / M
    assert peak < 0.75, f"{peak:.2f} M"
    for (name, p), (_, q) in zip(hf.named_parameters(), copy.named_parameters()):
        assert q.dtype == torch.bfloat16 and not q.requires_grad and torch.equal(q, p.detach().to(torch.bfloat16)), name
    for (name, b), (_, c) in zip(hf.named_buffers(), copy.named_buffers()):
        assert c.dtype == b.dtype and torch.equal(b, c), name
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    assert not copy.training


MIXED = '''
"""torchrun worker, --fsdp on 2 ranks, on two records, one with an image and one text-only: in every step one rank's
micro-batches have an image and the other's none. A cold-start step, then an AEPO step (old and reference log-probs,
rollouts and the update) from it, with the vision tower frozen (paper) and trained (--train-vision)."""
import sys

sys.path.insert(0, sys.argv[1])
import ares

out, model, sft, rl, vision = sys.argv[2:7]
extra = ["--fsdp", "--dist-timeout", "60"] + (["--train-vision"] if vision == "train" else [])
ares.train_coldstart(ares.parse_config(["--stage", "coldstart", "--model", model, "--data", sft, "--steps", "1",
                                        "--batch-size", "2", "--micro-batch-size", "1", "--out", f"{out}/cold", *extra]))
ares.train_aepo(ares.parse_config(["--stage", "aepo", "--model", f"{out}/cold/final", "--data", rl, "--steps", "1",
                                   "--batch-size", "2", "--group-size", "4", "--max-response-len", "8", "--minibatches",
                                   "2", "--keep-uniform-groups", "--log-samples-every", "0", "--out", f"{out}/aepo",
                                   *extra]))
ares.dist.destroy_process_group()
'''


@pytest.mark.parametrize("vision", ["frozen", "train"])
def test_fsdp_trains_when_one_ranks_micro_batches_have_no_image(vision, tiny_ckpt, demo_data, tmp_path):
    """FSDP2 gathers each sharded unit's weights with a collective that every rank must join. A rank whose micro-batch
    has no image would skip the vision tower's blocks, so it runs them on a blank image (weight 0), frozen or trained:
    a trained tower's gradients are then reduced on every rank too. Before: the ranks' collectives paired up wrongly
    and the run died with gloo's size mismatch (on GPUs, NCCL hangs)."""
    data = {}
    for split in ("sft", "rl"):
        first = json.loads(Path(demo_data[split]).read_text().splitlines()[0])
        first["images"] = [str(Path(demo_data[split]).parent / p) for p in first["images"]]
        text = dict(first, id="text-only", images=[], question="What is 2 + 3?", answer="5")
        if split == "sft":
            text["response"] = "<think>2 + 3 = 5.</think> The answer is \\\\boxed{5}."
        data[split] = tmp_path / f"{split}.jsonl"
        data[split].write_text("".join(json.dumps(r) + "\n" for r in (first, text)))
    script = tmp_path / "mixed.py"
    script.write_text(MIXED)
    run_script([script, ROOT, tmp_path, tiny_ckpt, data["sft"], data["rl"], vision], nproc=2, timeout=300)
    rows = [json.loads(line) for line in open(tmp_path / "aepo" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1]
    assert (tmp_path / "aepo" / "final" / "COMPLETE").exists()


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_gradient_accumulation_keeps_one_gradient_per_weight_sharded_under_fsdp(sharding, tiny_ckpt, demo_data,
                                                                                 tmp_path, monkeypatch):
    """Three cold-start steps of two micro-batches each, under torchrun (world size 1). DDP: once it has rebuilt its
    buckets (after the first step), every micro-batch's gradients stay in one tensor per weight, the view of DDP's
    bucket (before, the optimizer freed them, and each no_sync micro-batch made a second tensor beside the bucket:
    twice the gradients' memory). FSDP2: after every
    micro-batch each weight's gradient is its reduced shard (before, FSDP2 kept a full-size fp32 gradient per rank
    until the last micro-batch, and the shard stayed empty)."""
    from torch.distributed.tensor import DTensor

    seen, real = [], ares.sync_context

    @__import__("contextlib").contextmanager
    def recording(model, last):
        with real(model, last):
            yield
        seen.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})

    monkeypatch.setattr(ares, "sync_context", recording)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    cold, _ = small_runs(tiny_ckpt, demo_data, tmp_path)
    ares.main(cold + ["--steps", "3"] + (["--fsdp"] if sharding == "fsdp" else []))
    assert len(seen) == 6  # 3 steps x 2 micro-batches
    if sharding == "ddp":
        for name in seen[0]:
            assert len({micro[name].data_ptr() for micro in seen[2:]}) == 1, name
    else:
        assert all(isinstance(g, DTensor) for micro in seen for g in micro.values())


def test_ddp_with_train_vision_leaves_a_tower_no_micro_batch_used_where_it_was(tiny_ckpt, demo_data, tmp_path,
                                                                               monkeypatch):
    """README (three faults): with --train-vision DDP looks for unused weights, and the optimizer frees the gradients
    instead of zeroing them in DDP's buckets, so AdamW skips a vision tower that no micro-batch used in a step. A zeroed
    gradient would still move it, by the momentum of an earlier step with images and by weight decay. Cold start under
    torchrun (world size 1), one record a step, an image record and a text-only one: after every text-only step the
    tower is exactly what it was, after an image step it moved, and the language model moves every step."""
    first = json.loads(Path(demo_data["sft"]).read_text().splitlines()[0])
    first["images"] = [str(Path(demo_data["sft"]).parent / p) for p in first["images"]]
    text = dict(first, id="text-only", images=[], question="What is 2 + 3?", answer="5",
                response="<think>2 + 3 = 5.</think> The answer is \\boxed{5}.")
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps(first) + "\n" + json.dumps(text) + "\n")
    used, weights, real = [], [], ares.optimizer_step

    def stepping(opt, sched, params, clip, model=None):
        out = real(opt, sched, params, clip, model)
        weights.append({n: p.detach().clone() for n, p in model.module.hf.named_parameters()})
        return out

    real_indices = ares.step_indices
    monkeypatch.setattr(ares, "step_indices", lambda *a: used.append(real_indices(*a)) or used[-1])
    monkeypatch.setattr(ares, "optimizer_step", stepping)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    ares.main(["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(data), "--out", str(tmp_path / "cold"),
               "--steps", "6", "--batch-size", "1", "--train-vision", "--weight-decay", "0.1", "--warmup-steps", "0"])
    start = {n: p.detach() for n, p in ares.load_model(str(tiny_ckpt), ares.Config(), torch.device("cpu"))[0]
             .named_parameters()}
    before = [start] + weights[:-1]
    has_image = [bool(first["images"]) if i == 0 else False for [i] in used]  # record 0 has the image
    assert True in has_image[:-1] and any(a and not b for a, b in zip(has_image, has_image[1:])), used  # image, then text
    for step, (image, old, new) in enumerate(zip(has_image, before, weights)):
        tower = [n for n in new if ".visual." in f".{n}"]
        assert tower and all(torch.equal(old[n], new[n]) for n in tower) != image, (step, image)
        assert not any(torch.equal(old[n], new[n]) for n in new if n.endswith("embed_tokens.weight")), step


def test_fsdp_reshards_the_reference_and_the_old_policy_after_their_log_probs(tiny_ckpt, demo_data, tmp_path,
                                                                            monkeypatch):
    """An AEPO step under --fsdp (torchrun, world size 1), with the KL reference and 2 updates (old log-probs
    recomputed): after each no-grad log-prob pass every weight is its shard again. Before, FSDP2 kept the root unit
    (embeddings, head, the vision tower's patch embedding and merger) gathered, waiting for a backward that a
    reference never runs: 2.2 GiB a rank for 7B that the memory plan does not count."""
    from torch.distributed.tensor import DTensor

    checked, real = [], ares.logprobs_for

    def checking(model, *args, **kw):
        out = real(model, *args, **kw)
        checked.append([n for n, p in model.named_parameters() if not isinstance(p, DTensor)])
        return out

    monkeypatch.setattr(ares, "logprobs_for", checking)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    _, aepo = small_runs(tiny_ckpt, demo_data, tmp_path)
    aepo[aepo.index("--model") + 1] = str(tiny_ckpt)
    ares.main(aepo + ["--out", str(tmp_path / "aepo"), "--fsdp"])
    assert len(checked) == 2 and checked == [[], []]  # the reference's pass and the old policy's


def test_fsdp_flag_without_a_process_group_still_autocasts():
    """`python ares.py --fsdp` (no torchrun) trains a plain model: its bf16 autocast must stay on (before, --fsdp turned
    it off even there, and the run computed silently in fp32)."""
    cfg = ares.Config(model="tiny", fsdp=True, dtype="bf16")
    assert not dist.is_initialized()
    with ares.autocast(cfg, torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
    with ares.autocast(ares.Config(model="tiny", dtype="fp32"), torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


GAP = '''
import json
import sys
import types
import torch
import torch.distributed as dist
import torch.distributed.fsdp as fsdp
sys.path.insert(0, sys.argv[1])
import ares
dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 0:  # one kept row, 2 response tokens, each 0.1 off the sampler's
    mask, sampled, old, keep = [[1, 1, 0, 0]], [[-1.0, -2.0, 0.0, 0.0]], [[-1.1, -1.9, 5.0, 5.0]], [True]
else:  # a kept row of 4 tokens, each 0.4 off, and a filtered row far off
    mask, sampled, old, keep = [[1] * 4] * 2, [[-1.0] * 4] * 2, [[-1.4, -0.6, -1.4, -0.6], [-9.0] * 4], [True, False]
ro = types.SimpleNamespace(resp_mask=torch.tensor(mask), logprobs=torch.tensor(sampled))
stats = ares.update_stats(dict(clip_frac=0.0, tokens=0.0, kl=0.0, grad_norm=[]), torch.zeros(4, 3, dtype=torch.float64),
                          torch.tensor(old), ro, torch.tensor(keep))
with open(f"{sys.argv[2]}/gap{rank}.json", "w") as f:  # a file per rank: two ranks' printed lines can interleave
    json.dump(stats["logprob_gap"], f)
dist.destroy_process_group()
'''


def test_the_logprob_gap_in_the_log_is_over_the_kept_tokens_of_all_ranks(tmp_path):
    """logprob_gap (the sampler's log-probs against the trainer's recomputed old ones) on 2 ranks, by hand: rank 0 keeps
    2 response tokens 0.1 off each, rank 1 keeps 4 tokens 0.4 off each (and filters a row far off): (2 x 0.1 + 4 x 0.4)
    / 6 = 0.3 on both ranks, as one rank holding all the rows computes it (before: each rank's own, 0.1 and 0.4, and
    the log took rank 0's)."""
    (tmp_path / "gap.py").write_text(GAP)
    run_script([tmp_path / "gap.py", ROOT, tmp_path], nproc=2)
    got = {rank: json.loads((tmp_path / f"gap{rank}.json").read_text()) for rank in (0, 1)}
    assert got == {0: pytest.approx(0.3), 1: pytest.approx(0.3)}


def test_a_broken_group_is_left_to_the_exit_and_a_whole_one_is_closed(monkeypatch):
    """run_command closes the process group when a command ends (its gloo threads must not outlive it), but not after
    a collective failed: the group's work may still wait on the stalled peer, and destroying the group joins it. Under
    load, rank 0 of the stalled-rank test above then blocked there, so its line was never printed (one run) or the job
    hung past 300 s (another). Here the group is a stand-in that records whether it was destroyed."""
    closed = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: closed.append(1))

    def stalled():
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms for recv operation to "
                           "complete")

    with pytest.raises(SystemExit) as e:
        ares.run_command(stalled)
    assert str(e.value).startswith("rank 0: a collective waited more than its time limit (30 min)")
    assert closed == []
    assert ares.run_command(lambda: 7) == 7 and closed == [1]
    with pytest.raises(SystemExit):  # a command's own stop (a bad flag, a data error) closes it too
        ares.run_command(lambda: sys.exit("bad flag"))
    assert closed == [1, 1]
