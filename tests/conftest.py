"""Shared fixtures: everything offline, on the CPU, small enough for a 2-core CI machine."""
import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)

import ares  # noqa: E402
import data_prep  # noqa: E402


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from intra-op threads; on a shared 2-core machine two spinning threads per process
    make in-process runs several times slower (the subprocesses run with OMP_NUM_THREADS=1 too). Test files that
    train in-process use it for every test: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """A small demo task: {'sft', 'rl', 'test', 'pool', 'pool_traces': path} (levels balanced)."""
    out = tmp_path_factory.mktemp("demo")
    return data_prep.make_demo(out, seed=0, sizes={"sft": 96, "rl": 48, "test": 24, "pool": 90})


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): the tiny random Qwen2.5-VL, fp32, eval mode."""
    model, processor = ares.build_tiny(seed=0)
    return model.eval(), processor


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny) -> Path:
    """The tiny model saved in Hugging Face format (a folder --model accepts)."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    model, processor = tiny
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def full_size_model(tmp_path_factory) -> str:
    """A folder that passes for a real (not tiny) model without weights: a Qwen2 config.json alone. The flag tests
    used a made-up hub name for this; --model now checks that a name that is not a folder is on the hub."""
    folder = tmp_path_factory.mktemp("full_size_model")
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return str(folder)


def run_script(args: list[str], nproc: int = 1, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run `python <args>` (or `torchrun --nproc_per_node=nproc <args>`) offline on the CPU; fail with its output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
                              if nproc > 1 else []) + [str(a) for a in args]
    res = subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def foreground():
    """SIGINT as a terminal's foreground job has it (a subprocess's preexec_fn): a background job of a non-interactive
    shell (`cmd &`) starts with it ignored, and Python and ares.py keep it ignored there, so a test would not see a
    Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def steps_logged(out: Path) -> list[int]:
    """The steps of <out>/metrics.jsonl's rows, in the order they were logged."""
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if line.strip()]


class Killed(Exception):
    """The simulated kill of a training process."""


def run_until_first_step_save(monkeypatch, run):
    """Call run(), killing it (Killed) right after its first step checkpoint is written, as a crash would."""
    save = ares.save_checkpoint

    def save_then_die(path, name, *args, **kw):
        done = save(path, name, *args, **kw)
        if name.startswith("step_"):
            raise Killed(name)
        return done

    with monkeypatch.context() as patch:
        patch.setattr(ares, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run()


class LayerRecomputes:
    """Counts, over calls made with gradients on, each decoder layer's calls (its __call__, once per forward: Hugging
    Face checkpoints the layer's forward inside it) and its MLP's (once per forward, and once more when backward
    recomputes a checkpointed layer). recomputed = their difference: the checkpointed layer calls of the gradient
    forwards so far (0 without checkpointing)."""

    def __init__(self, model):
        self.layer = self.mlp = 0
        for m in model.modules():
            if type(m).__name__.endswith("DecoderLayer"):
                m.register_forward_pre_hook(lambda module, args: self.count("layer"))
                m.mlp.register_forward_pre_hook(lambda module, args: self.count("mlp"))

    def count(self, what: str):
        setattr(self, what, getattr(self, what) + torch.is_grad_enabled())

    @property
    def recomputed(self) -> int:
        return self.mlp - self.layer


def stand_ins_for(argv: list[str]):
    """What a command's flags name, made in the working folder (or where an absolute path points) as the flag checks
    need it and nothing more: every --model but `tiny` a folder with a model's config.json and a tokenizer.json (a
    hub name's stand-in too: a folder of that name is read before the hub), every .jsonl or .parquet --data,
    --pass-rates and --eval-data an empty file (no check reads the records)."""
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--model", "--ref-model") and value != "tiny":
            Path(value).mkdir(parents=True, exist_ok=True)
            (Path(value) / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
            (Path(value) / "tokenizer.json").write_text("{}")  # data_prep.py adacs --model reads a tokenizer
        if flag in ("--data", "--pass-rates", "--eval-data") and Path(value).suffix in (".jsonl", ".parquet"):
            Path(value).parent.mkdir(parents=True, exist_ok=True)
            Path(value).write_text("")


def accepts(argv: list[str], monkeypatch):
    """Run `python <argv>` through its program's own main, flag checks and all (each flag by its full name), with the
    work that would follow them replaced by nothing: ares.py's stages by the checks start_stage makes before it reads
    the data (the stage's defaults filled in, then validate_config again), eval.py passrate by check_passrate_args,
    which run_passrate makes first; the demo's own checks are parse_config's (check_demo)."""
    import eval as ev

    for stage in ("coldstart", "aepo"):
        monkeypatch.setattr(ares, f"train_{stage}",
                            lambda cfg, stage=stage: ares.validate_config(ares.resolve_stage_defaults(cfg, stage)))
    monkeypatch.setattr(ares, "run_demo", lambda cfg: None)
    monkeypatch.setattr(ev, "run_passrate", ev.check_passrate_args)
    for name in ("run_curves", "run_demo_report", "evaluate_and_report"):
        monkeypatch.setattr(ev, name, lambda args: None)
    for name in ("run_convert", "run_adacs", "run_demo"):
        monkeypatch.setattr(data_prep, name, lambda args: None)

    def full_names_only(self, *args, **kwargs):  # argparse takes a prefix: --question-col for a --question-column
        argparse.ArgumentParser.__init__(self, *args, **{**kwargs, "allow_abbrev": False})  # it was renamed to

    monkeypatch.setattr(data_prep.OneLineParser, "__init__", full_names_only)
    main = {"ares.py": ares.main, "eval.py": ev.main, "data_prep.py": data_prep.main}[argv[0]]
    try:
        main(argv[1:])
    except SystemExit as stop:  # --help: 0, having printed every flag
        if stop.code != 0 or argv[-1] != "--help":
            raise
