"""Issue 12: every model family the README names trains in both stages, at tiny size, offline: Qwen2-VL,
Qwen2.5-VL, Qwen3-VL (whose decoder also reads vision "deepstack" features) and text-only causal LMs (Qwen2,
Qwen3) on text-only records. Each family gets a random tiny model built from its config with the tiny tokenizer,
saved as an ordinary Hugging Face folder and passed as --model.

References: one plain `model(...)` forward over the unpadded sequence (the model computes its own positions and
vision features), a hand-written log-softmax and gather; and `from_pretrained` of the saved folder.
"""
import importlib
import json
from pathlib import Path

import pytest
import torch

from conftest import LayerRecomputes

import ares
import data_prep

ev = importlib.import_module("eval")  # `import eval` would shadow the builtin eval() here
T = 0.8
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2", "qwen3"]
TEXT_ONLY = {"qwen2", "qwen3"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_model(family: str, seed: int = 0):
    """(model, processor) of a random tiny model of `family`, sized like ares.TINY_SIZES."""
    import transformers as tf

    tok = data_prep.tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    s = ares.TINY_SIZES
    text = dict(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=4096,
                tie_word_embeddings=True, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"))
    vision_ids = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                      vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                      tie_word_embeddings=True, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    patch = 14
    if family == "qwen2_5_vl":
        model, processor = ares.build_tiny(seed)
        model.config.ares_tiny = True
        return model, processor
    if family == "qwen2":
        config, cls = tf.Qwen2Config(**text), tf.Qwen2ForCausalLM
    elif family == "qwen3":
        config, cls = tf.Qwen3Config(**text, head_dim=24), tf.Qwen3ForCausalLM
    elif family == "qwen2_vl":
        config = tf.Qwen2VLConfig(
            text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [2, 5, 5]}),
            vision_config=dict(depth=2, embed_dim=48, hidden_size=s["hidden"], num_heads=2, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2), **vision_ids)
        cls = tf.Qwen2VLForConditionalGeneration
    else:  # qwen3_vl: 16-pixel patches, interleaved 3-D rotary sections, deepstack features from vision layer 0
        patch = 16
        config = tf.Qwen3VLConfig(
            text_config=dict(text, head_dim=24, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                     mrope_section=[4, 4, 4], mrope_interleaved=True)),
            vision_config=dict(depth=2, hidden_size=48, intermediate_size=96, num_heads=2, out_hidden_size=s["hidden"],
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                               deepstack_visual_indexes=[0]), **vision_ids)
        cls = tf.Qwen3VLForConditionalGeneration
    config.ares_tiny = True  # CPU-sized stage defaults
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.bos_token_id = None
    if family in TEXT_ONLY:
        return model, tok
    image_processor = tf.Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=(4 * patch) ** 2,
                                                  max_pixels=(8 * patch) ** 2)
    return model, ares.processor_class()(image_processor, tok, chat_template=data_prep.TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param)
    model, processor = tiny_model(request.param)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return request.param, out


@pytest.fixture(scope="module")
def family_data(demo_data, tmp_path_factory) -> dict:
    """Two cold-start records and four prompts, with their images (VLMs) and without (text-only LMs)."""
    out = tmp_path_factory.mktemp("family_data")
    files = {}
    for kind in ("vlm", "text"):
        for split, n in (("sft", 2), ("rl", 4)):
            rows = [json.loads(line) for line in open(demo_data[split])][:n]
            base = Path(demo_data[split]).parent
            rows = [dict(r, images=[str(base / im) for im in r["images"]] if kind == "vlm" else []) for r in rows]
            files[kind, split] = out / f"{kind}_{split}.jsonl"
            files[kind, split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def banned(model) -> list[int]:
    return [i for i in (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
            if i is not None]


def plain_logprobs(model, prompt: dict, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens[k] | prompt, tokens[:k]) from ONE plain forward of the unpadded sequence. -> (n,)."""
    seq = torch.cat([prompt["ids"], tokens])[None]
    kw = dict(input_ids=seq, attention_mask=torch.ones_like(seq))
    if prompt["pixel_values"] is not None:
        kw.update(pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])
    if getattr(model.config, "image_token_id", None) is not None:
        kw["mm_token_type_ids"] = (seq == model.config.image_token_id).int()
    P = len(prompt["ids"])
    logits = model(**kw).logits[0, P - 1:-1].float()
    logits[:, banned(model)] = -float("inf")
    return torch.log_softmax(logits / temperature, -1).gather(1, tokens[:, None])[:, 0]


def test_sampler_and_trainer_logprobs_equal_teacher_forcing(family_ckpt, family_data):
    family, ckpt = family_ckpt
    model, processor = ares.load_model(str(ckpt), ares.Config(), torch.device("cpu"))
    model.eval()
    records = data_prep.load_records(str(family_data["text" if family in TEXT_ONLY else "vlm", "rl"]))[:3]
    prompts = [data_prep.encode_prompt(processor, r) for r in records]
    assert (prompts[0]["pixel_values"] is None) == (family in TEXT_ONLY)
    ids = ares.special_ids(model, processor)
    out = ares.sample(model, prompts, ids=ids, max_new_tokens=10, repeats=2, temperature=T, top_p=0.95,
                      generator=torch.Generator().manual_seed(0))
    rows = [(i // 2, out["tokens"][i, :int(out["mask"][i].sum())]) for i in range(len(out["tokens"]))]
    batch = ares.make_batch(model, [prompts[p] for p, _ in rows], [t for _, t in rows], ids["pad"], "cpu")
    with torch.no_grad():
        trainer, _ = ares.Policy(model)(batch, T)
    for i, (p, toks) in enumerate(rows):
        want = plain_logprobs(model, prompts[p], toks, T)
        torch.testing.assert_close(out["logprobs"][i, :len(toks)], want, atol=1e-4, rtol=0)
        torch.testing.assert_close(trainer[i, :len(toks)], want, atol=1e-4, rtol=0)


def test_kv_pool_sampler_samples_what_the_eager_sampler_samples(family_ckpt, family_data):
    """The --compile path's KVPool (its step run eagerly here: Hugging Face's layers with the pool as their cache, the
    pool's attention function, 3-D or 1-D rotary positions) against the eager sampler, in every family: the same
    tokens, log-probs equal to 1e-5, from prompts of unequal lengths with ragged stops."""
    family, ckpt = family_ckpt
    model, processor = ares.load_model(str(ckpt), ares.Config(), torch.device("cpu"))
    model.eval()
    records = data_prep.load_records(str(family_data["text" if family in TEXT_ONLY else "vlm", "rl"]))[:3]
    prompts = [data_prep.encode_prompt(processor, r) for r in records]
    ids = dict(ares.special_ids(model, processor))
    ids["stop"] = sorted(set(ids["stop"]) | set(range(100, 140)))  # ragged stops
    kw = dict(ids=ids, max_new_tokens=12, repeats=2, temperature=T, top_p=0.95)
    eager = ares.sample(model, prompts, generator=torch.Generator().manual_seed(0), **kw)
    pooled = ares.sample(model, prompts, generator=torch.Generator().manual_seed(0), pool=ares.KVPool(6, 400, compile=False), **kw)
    assert len(set(eager["mask"].sum(1).tolist())) > 1
    assert torch.equal(pooled["tokens"], eager["tokens"]) and torch.equal(pooled["mask"], eager["mask"])
    torch.testing.assert_close(pooled["logprobs"], eager["logprobs"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_forward_gives_the_logprobs_and_gradients_of_whole_sequences(family_ckpt, family_data,
                                                                                   checkpointing):
    """The update's forward (each distinct prompt once into a KV cache, then every response as one continuation)
    against a plain forward of each row's unpadded prompt + response: log-probs to 1e-5 and the gradients of a few
    parameters (embedding/head, attention, MLP, vision) of the summed log-probs, fp32. One micro-batch holds two
    prompts of unequal lengths (3 and 2 responses, all of unequal lengths), as a group's rows sorted together do.
    With --grad-checkpointing (the trainer's make_trainable, every weight trained) the same forward runs with every
    decoder layer checkpointed, prompt and responses alike: each is recomputed in backward."""
    family, ckpt = family_ckpt
    model, processor = ares.load_model(str(ckpt), ares.Config(), torch.device("cpu"))
    model.eval()
    records = data_prep.load_records(str(family_data["text" if family in TEXT_ONLY else "vlm", "rl"]))[:2]
    records[1] = dict(records[1], question=records[1]["question"] + " Think carefully, then answer.")
    prompts = [data_prep.encode_prompt(processor, r) for r in records]
    assert len(prompts[0]["ids"]) != len(prompts[1]["ids"])
    ids = ares.special_ids(model, processor)
    gen = torch.Generator().manual_seed(0)
    allowed = torch.tensor([t for t in range(300) if t not in banned(model)])
    rows = [(p, allowed[torch.randint(len(allowed), (n,), generator=gen)]) for p, n in ((0, 7), (0, 3), (0, 12),
                                                                                          (1, 5), (1, 9))]
    names = [n for n, _ in model.named_parameters() if any(k in n for k in (
        "embed_tokens", "layers.0.self_attn.k_proj.weight", "layers.1.mlp.down_proj", "visual.blocks.0.mlp"))]
    assert len(names) >= (3 if family in TEXT_ONLY else 4)

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if n in names}
        model.zero_grad()
        return out

    want = []
    for p, toks in rows:
        want.append(plain_logprobs(model, prompts[p], toks, T))
        want[-1].sum().backward()
    want_grads = grads()
    if checkpointing:
        model = ares.make_trainable(model, ares.Config(grad_checkpointing=True, train_vision=True))
        assert model.training and model.is_activation_checkpointing
    counts = LayerRecomputes(model)
    batch = ares.shared_prompt_batch(model, [prompts[p] for p, _ in rows], [t for _, t in rows], ids, "cpu")
    assert batch["input_ids"].shape[0] == 2  # each prompt once
    got, _ = ares.Policy(model)(batch, T)
    (got * batch["resp_mask"]).sum().backward()
    layers = model.config.get_text_config().num_hidden_layers
    assert counts.layer == 2 * layers and counts.recomputed == (2 * layers if checkpointing else 0)  # two passes
    for i, (p, toks) in enumerate(rows):
        torch.testing.assert_close(got[i, :len(toks)], want[i], atol=1e-5, rtol=0)
    for n, g in grads().items():
        assert want_grads[n].abs().sum() > 0, n
        torch.testing.assert_close(g, want_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_cold_start_then_aepo_with_branching_then_from_pretrained(family_ckpt, family_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    family, ckpt = family_ckpt
    kind = "text" if family in TEXT_ONLY else "vlm"
    model, processor = ares.load_model(str(ckpt), ares.Config(), torch.device("cpu"))
    total, count = 0.0, 0  # the reference cold-start loss: one token-mean over both records' responses
    tok = data_prep.tokenizer_of(processor)
    for r in data_prep.load_records(str(family_data[kind, "sft"]), need_response=True):
        response = torch.tensor(tok(r["response"], add_special_tokens=False)["input_ids"] + [ids_eot(tok)])
        total -= plain_logprobs(model, data_prep.encode_prompt(processor, r), response).sum().item()
        count += len(response)
    cold = tmp_path / "cold"
    if family in TEXT_ONLY:  # records with images, for a text-only model: one line naming the file and the record
        with pytest.raises(SystemExit) as e:
            ares.main(["--stage", "coldstart", "--model", str(ckpt), "--data", str(family_data["vlm", "sft"]), "--out",
                       str(tmp_path / "images"), "--steps", "1"])
        assert str(e.value).startswith(f"data error: {family_data['vlm', 'sft']}: record ") and \
            str(e.value).endswith("has images but the model is text-only"), e.value
    ares.main(["--stage", "coldstart", "--model", str(ckpt), "--data", str(family_data[kind, "sft"]), "--out", str(cold),
               "--steps", "1", "--batch-size", "2", "--micro-batch-size", "2"])
    logged = [json.loads(line) for line in open(cold / "metrics.jsonl")]
    assert logged[0]["loss"] == pytest.approx(total / count, rel=1e-5)
    aepo = tmp_path / "aepo"
    ares.main(["--stage", "aepo", "--model", str(cold / "final"), "--data", str(family_data[kind, "rl"]), "--out",
               str(aepo), "--steps", "1", "--batch-size", "4", "--group-size", "4", "--max-response-len", "16",
               "--window", "2", "--entropy-quantile", "0.5", "--keep-uniform-groups", "--minibatches", "2",
               "--log-samples-every", "0"])
    row = json.loads(open(aepo / "metrics.jsonl").readline())
    assert row["branches"] > 0 and row["groups_kept"] == 4
    assert row["logprob_gap"] < 1e-4  # the trainer's old log-probs are the sampler's
    cls = AutoModelForCausalLM if family in TEXT_ONLY else AutoModelForImageTextToText
    loaded, info = cls.from_pretrained(aepo / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(loaded) is type(model)
    start = dict(model.named_parameters())
    assert any(not torch.equal(p, start[n]) for n, p in loaded.named_parameters())  # trained
    assert AutoTokenizer.from_pretrained(aepo / "final")("\\boxed{7}")["input_ids"] == tok("\\boxed{7}")["input_ids"]


def test_eval_data_a_text_only_model_cannot_read_stops_before_the_weights_load(family_data, tmp_path, monkeypatch):
    # --eval-data of image records for a text-only model: validate counted every one as wrong, a silent 0% at every
    # validation. Now it stops as --data does, naming --eval-data, the file and the record.
    model, tok = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    monkeypatch.setattr(ares, "load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    held_out = family_data["vlm", "rl"]
    first = json.loads(open(held_out).readline())["id"]
    with pytest.raises(SystemExit) as e:
        ares.main(["--stage", "aepo", "--model", str(tmp_path / "qwen3"), "--data", str(family_data["text", "rl"]),
                   "--eval-data", str(held_out), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2"])
    assert str(e.value) == (f"data error: --eval-data: {held_out}: record {first}: has images but the model is "
                            "text-only")


@pytest.mark.parametrize("tool, flags", [("ares", ["--train-vision"]), ("ares", ["--min-pixels", "3136"]),
                                         ("ares", ["--max-pixels", "50176"]), ("passrate", ["--min-pixels", "3136"]),
                                         ("passrate", ["--max-pixels", "50176"]), ("eval", ["--min-pixels", "3136"]),
                                         ("eval", ["--max-pixels", "50176"])])
def test_a_vision_flag_for_a_text_only_model_stops_before_the_weights_load(tool, flags, family_data, tmp_path,
                                                                            monkeypatch):
    # a text-only model has no tower to train and no images to resize: the flag was accepted and did nothing (passrate
    # had no pixel flags: it sampled at the defaults whatever training got)
    model, tok = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "qwen2")
    tok.save_pretrained(tmp_path / "qwen2")
    monkeypatch.setattr(ares, "load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    with pytest.raises(SystemExit) as e:
        if tool == "ares":
            ares.main(["--stage", "aepo", "--model", str(tmp_path / "qwen2"), "--data", str(family_data["text", "rl"]),
                       "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", *flags])
        elif tool == "passrate":
            ev.main(["passrate", "--data", str(family_data["text", "rl"]), "--model", str(tmp_path / "qwen2"), "--out",
                     str(tmp_path / "rates.jsonl"), *flags])
        else:  # the evaluation ran to the end and ignored the flag
            ev.main(["--model", str(tmp_path / "qwen2"), "--data", str(family_data["text", "rl"]), "--out",
                     str(tmp_path / "eval"), *flags])
    assert str(e.value) == (f"{flags[0]}: --model {tmp_path / 'qwen2'} is a text-only model (no vision tower, no "
                            "images), so the flag would do nothing: leave it out")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "rates.jsonl").exists()
    assert not (tmp_path / "eval").exists()
    if tool == "eval":  # beside a vision-language model the flags are that model's: no stop
        cfg = ev.parse_config(["--model", str(tmp_path / "qwen2"), "--model", "tiny", "--data", "d.jsonl", "--out",
                               str(tmp_path / "eval"), *flags])
        assert flags[0][2:].replace("-", "_") in cfg.given and len(cfg.model) == 2


def ids_eot(tok) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("model_type", ["llava", "qwen3_vl_moe", "gpt2"])
def test_an_unsupported_family_fails_clearly_at_load(model_type, tmp_path):
    """Other vision-language architectures stop before any weight is read; a causal LM without `.model` after."""
    import transformers as tf

    if model_type == "gpt2":
        tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    else:
        tf.AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match=f"model type '{model_type}' is not supported: ARES runs Qwen2-VL, Qwen2.5-VL, "
                                         "Qwen3-VL and text-only causal LMs"):
        ares.load_model(str(tmp_path), ares.Config(), torch.device("cpu"))
    if model_type != "gpt2":  # through the command too (README: before its tokenizer is read: the folder has none)
        data = tmp_path / "d.jsonl"
        data.write_text(json.dumps(dict(id="a", question="What is 1 + 1?", answer="2")) + "\n")
        for argv in (["--stage", "aepo", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"],
                     ["--data", str(data), "--out", str(tmp_path / "eval")]):
            with pytest.raises(SystemExit) as err:
                (ares.main if "--stage" in argv else ev.main)(["--model", str(tmp_path), *argv])
            assert str(err.value.code) == f"{tmp_path}: model type '{model_type}' {ares.UNSUPPORTED}"


@pytest.mark.parametrize("case", ["gpt2", "no chat template"])
def test_a_model_ares_cannot_prompt_or_train_stops_in_one_line_through_the_command(case, tmp_path):
    """Through `ares.py --model`, not load_model: a GPT-2 folder (decoder `.transformer`) whose tokenizer has no chat
    template ended in a chat-template traceback before the family check ran; a supported text model without a chat
    template (a base model) ended in the same traceback. Both now stop in one line before any weight is read."""
    import transformers as tf

    folder = tmp_path / "model"
    model, tok = tiny_model("qwen2")
    if case == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=32))
    tok.chat_template = None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps(dict(id="a", question="What is 1 + 1?", answer="2", response="<think>1 + 1 = 2.</think> "
                                                                                      "\\boxed{2}")) + "\n")
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", "coldstart", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "out"),
                   "--steps", "1", "--batch-size", "1"])
    msg = str(err.value.code)
    assert "\n" not in msg and msg == (f"{folder}: model type 'gpt2' {ares.UNSUPPORTED}" if case == "gpt2" else
                                       f"--model {folder}: its tokenizer has no chat template, and ARES builds every "
                                       "prompt with it: use a chat or Instruct model, or add a template "
                                       "(chat_template.jinja beside the tokenizer)"), msg


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in TEXT_ONLY])
def test_a_blank_image_reaches_every_vision_weight_with_a_zero_gradient(family):
    """FSDP2's rank without images runs the tower on a blank image (ares.blank_image_features): the scalar is 0, and its
    backward gives every weight of the tower a gradient, all zeros (a weight left without one would leave that rank
    out of the gradient reduction). Qwen3-VL's deepstack mergers included."""
    model, _ = tiny_model(family)
    anchor = ares.blank_image_features(model.model)
    assert anchor.item() == 0.0
    anchor.backward()
    missing = [n for n, p in model.model.visual.named_parameters() if p.grad is None]
    assert not missing
    assert all(not p.grad.any() for p in model.model.visual.parameters())


def test_the_tiny_name_takes_the_pixel_flags_as_a_tiny_checkpoint_does():
    # `--model tiny` kept 56x56 to 112x112 pixels whatever --min-pixels / --max-pixels said; a saved tiny checkpoint
    # takes them when given. A 448 x 448 image is one vision token per 28 x 28 pixels after resizing (patch 14, merge
    # 2): 112 x 112 -> 4 x 4 tokens, 224 x 224 -> 8 x 8
    from PIL import Image

    image = Image.new("RGB", (448, 448), "white")
    for given, tokens in (((), 4 * 4), (("max_pixels",), 8 * 8)):
        cfg = ares.Config(max_pixels=224 * 224, given=given)
        for processor in (ares.processor_for("tiny", cfg), ares.load_model("tiny", cfg, torch.device("cpu"))[1]):
            grid = processor.image_processor(images=[image])["image_grid_thw"]
            assert int(grid.prod()) // 4 == tokens, (given, grid)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_a_vlm_checkpoint_resizes_images_between_the_pixel_flags_not_its_saved_sizes(family, tmp_path):
    # README (model families): every VLM family resizes between --min-pixels and --max-pixels (defaults 56 x 56 to
    # 1280 x 28 x 28), in place of its saved processor settings (here at most 8 x 8 cells); only the tiny model keeps
    # its own. A 448 x 448 image is (448 / patch)^2 patches at the defaults, (224 / patch)^2 at --max-pixels 224 x 224
    from PIL import Image

    model, processor = tiny_model(family)
    del model.config.ares_tiny  # a checkpoint of a real model
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    patch = 16 if family == "qwen3_vl" else 14
    image = Image.new("RGB", (448, 448), "white")
    for cfg, side in ((ares.Config(), 448), (ares.Config(max_pixels=224 * 224, given=("max_pixels",)), 224)):
        for proc in (ares.processor_for(str(tmp_path), cfg), ares.load_model(str(tmp_path), cfg, torch.device("cpu"))[1]):
            assert proc.image_processor.size == {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
            assert proc.image_processor(images=[image])["image_grid_thw"].tolist() == [[1, side // patch, side // patch]]


def test_lora_adapts_an_untied_output_head_and_the_export_merges_it(family_data, tmp_path):
    # README (LoRA): lm_head is refused only where it shares the input embeddings; a model with its own output head
    # (tie_word_embeddings false, as Qwen2.5-VL-7B) takes an adapter there, merged into the export's lm_head
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    model, tok = tiny_model("qwen2")
    model.config.tie_word_embeddings = False
    model = type(model)(model.config)
    model.generation_config.eos_token_id = [ids_eot(tok), tok.convert_tokens_to_ids("<|endoftext|>")]
    model.save_pretrained(tmp_path / "untied")
    tok.save_pretrained(tmp_path / "untied")
    ares.main(["--stage", "aepo", "--model", str(tmp_path / "untied"), "--data", str(family_data["text", "rl"]), "--out",
               str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--group-size", "4", "--max-response-len",
               "8", "--log-samples-every", "0", "--keep-uniform-groups", "--lora-rank", "4", "--lora-targets",
               "q_proj,lm_head", "--lr", "1e-2"])
    adapter = load_file(str(tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors"))
    A, B = (adapter[f"base_model.model.lm_head.lora_{x}.weight"] for x in "AB")  # (r, hidden), (vocab, r)
    base = load_file(str(tmp_path / "untied" / "model.safetensors"))["lm_head.weight"]
    export = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))["lm_head.weight"]
    assert B.abs().sum() > 0 and not torch.equal(export, base)
    torch.testing.assert_close(export, base + 8 / 4 * B @ A, atol=1e-6, rtol=0)  # alpha / R: the default alpha is 2R
