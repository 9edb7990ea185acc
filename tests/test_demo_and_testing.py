"""The embedded demo model and random checkpoints must be deterministic, load in transformers (the reference the
engine is compared against) and behave like a model: finite, non-degenerate, context-dependent output."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from swiftlm import demo
from swiftlm.demo import demo_model_path
from swiftlm.testing import TINY_ARCHS, checkpoint_layout, make_random_checkpoint, tiny_config

REPO = Path(__file__).resolve().parents[1]


def file_digests(path: str) -> dict[str, str]:
    return {name: hashlib.sha256(Path(path, name).read_bytes()).hexdigest() for name in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return demo_model_path(str(tmp_path_factory.mktemp("demo-cache")))


@pytest.fixture(scope="module")
def demo_tokenizer(demo_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir)


def load_hf(path: str):
    """Load with transformers, failing if any tensor was missing (it would be silently re-initialised)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_demo_is_deterministic_and_race_safe(demo_dir: str, tmp_path: Path) -> None:
    other = demo_model_path(str(tmp_path / "in-process"))
    assert file_digests(other) == file_digests(demo_dir)
    assert set(os.listdir(demo_dir)) == {"config.json", "generation_config.json", "model.safetensors",
                                         "tokenizer.json", "tokenizer_config.json"}
    # Two fresh processes racing to build the same cache: both succeed, agree, and leave no temp dirs behind.
    shared = tmp_path / "shared"
    code = "import sys; from swiftlm.demo import demo_model_path; print(demo_model_path(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(shared)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(shared / "demo-v1")] * 2
    assert os.listdir(shared) == ["demo-v1"]
    assert file_digests(outs[0]) == file_digests(demo_dir)


def test_demo_cache_reused_and_env_respected(demo_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mtime = os.path.getmtime(os.path.join(demo_dir, "model.safetensors"))
    root = os.path.dirname(demo_dir)
    assert demo_model_path(root) == demo_dir
    monkeypatch.setenv("SWIFTLM_CACHE", root)
    assert demo_model_path() == demo_dir
    assert os.path.getmtime(os.path.join(demo_dir, "model.safetensors")) == mtime


def test_demo_checkpoint_layout(demo_dir: str) -> None:
    with open(os.path.join(demo_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["tie_word_embeddings"] is True
    with safe_open(os.path.join(demo_dir, "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in names
    assert "model.layers.1.self_attn.q_norm.weight" in names and "model.norm.weight" in names
    assert names == {name for name, _ in checkpoint_layout(cfg)}
    with open(os.path.join(demo_dir, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [demo.IM_END_ID, demo.ENDOFTEXT_ID]


def test_demo_tokenizer(demo_tokenizer) -> None:
    tok = demo_tokenizer
    assert len(tok) == demo.DEMO_CONFIG["vocab_size"]
    assert [tok.convert_tokens_to_ids(t) for t in demo.SPECIAL_TOKENS] == [demo.ENDOFTEXT_ID, demo.IM_START_ID,
                                                                          demo.IM_END_ID]
    assert tok.eos_token_id == demo.IM_END_ID
    for text in ["The lighthouse keeper woke before the sun.", "emoji 😀🚀👩‍👩‍👧 flags 🇯🇵", "中文文本，日本語のテキスト、한국어",
                 "e\u0301 vs \u00e9, tabs\tand\r\nnewlines  ", "\x00\x7f control", "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # Trained on English: common words are single tokens, and special tokens are atomic.
    assert len(tok.encode(" the")) == 1
    assert tok.encode("<|im_end|>") == [demo.IM_END_ID]


def test_demo_chat_template(demo_tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    text = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                    "<|im_start|>assistant\n")
    no_prompt = demo_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("Hi there<|im_end|>\n")


def test_demo_model_loads_and_is_not_degenerate(demo_dir: str, demo_tokenizer) -> None:
    model = load_hf(demo_dir)
    assert model.config.vocab_size == len(demo_tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = demo_tokenizer("The lighthouse keeper climbed the stairs", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        gen = out[0, ids.shape[1]:].tolist()
        logits = model(out).logits[0]
        changed = out.clone()
        changed[0, 0] = (changed[0, 0] + 1) % 1000
        logits_changed = model(changed).logits[0]
    assert torch.isfinite(logits).all()
    assert len(set(gen)) >= 15  # no echo loop of one or two tokens
    echoes = sum(a == b for a, b in zip(out[0, ids.shape[1] - 1:-1].tolist(), gen))
    assert echoes <= 8
    # attention matters: changing the first token changes predictions far later in the sequence
    assert (logits.argmax(-1)[-20:] != logits_changed.argmax(-1)[-20:]).any()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_random_checkpoint_loads_in_transformers(arch: str, demo_dir: str, tmp_path: Path) -> None:
    cfg = tiny_config(arch)
    out = make_random_checkpoint(cfg, str(tmp_path / arch), dtype="float32", seed=3, tokenizer_from=demo_dir)
    model = load_hf(out)
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["rope_theta"] == cfg["rope_theta"] and written["torch_dtype"] == "float32"
    assert model.config.num_hidden_layers == cfg["num_hidden_layers"]
    if arch == "qwen3_moe":
        assert written["num_experts"] == 8
        assert (model.config.num_experts, model.config.num_experts_per_tok, model.config.norm_topk_prob) == (8, 2, True)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        names = set(f.keys())
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, q)
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (arch == "qwen2")
    assert ("lm_head.weight" in names) == (not cfg["tie_word_embeddings"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Hello, world!", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"])
    assert torch.isfinite(logits).all() and logits.std() > 0.5


def test_random_checkpoint_seed_dtype_overrides_and_shards(demo_dir: str, tmp_path: Path) -> None:
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(tiny_config("qwen3_moe")))
    overrides = {"num_hidden_layers": 3, "mlp_only_layers": [1], "vocab_size": 1100}
    a = make_random_checkpoint(str(cfg_path), str(tmp_path / "a"), seed=1, overrides=overrides,
                               tokenizer_from=demo_dir, max_shard_bytes=100_000)
    b = make_random_checkpoint(str(cfg_path), str(tmp_path / "b"), seed=1, overrides=overrides,
                               tokenizer_from=demo_dir, max_shard_bytes=100_000)
    c = make_random_checkpoint(str(cfg_path), str(tmp_path / "c"), seed=2, overrides=overrides,
                               tokenizer_from=demo_dir, max_shard_bytes=100_000)
    assert file_digests(a) == file_digests(b)
    shards = sorted(n for n in os.listdir(a) if n.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(a)
    assert file_digests(a)[shards[0]] != file_digests(c)[shards[0]]
    with open(os.path.join(a, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert "model.layers.1.mlp.gate_proj.weight" in weight_map  # dense layer from mlp_only_layers
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in weight_map
    with safe_open(os.path.join(a, weight_map["model.embed_tokens.weight"]), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.bfloat16 and embed.shape == (1100, 64)
    model = load_hf(a)  # vocab larger than the tokenizer's: just unused rows
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, demo.IM_END_ID]])).logits).all()


def test_random_checkpoint_tokenizer_choice(demo_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWIFTLM_CACHE", os.path.dirname(demo_dir))
    fits = make_random_checkpoint(tiny_config("qwen2"), str(tmp_path / "fits"))
    assert file_digests(fits)["tokenizer.json"] == file_digests(demo_dir)["tokenizer.json"]
    with open(os.path.join(fits, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == demo.IM_END_ID
    small = make_random_checkpoint(tiny_config("qwen2", vocab_size=512), str(tmp_path / "small"))
    assert "tokenizer.json" not in os.listdir(small) and "config.json" in os.listdir(small)
    with open(os.path.join(small, "config.json")) as f:
        assert json.load(f)["eos_token_id"] is None
    with pytest.raises(ValueError, match="vocab_size"):
        make_random_checkpoint(tiny_config("qwen2", vocab_size=512), str(tmp_path / "bad"), tokenizer_from=demo_dir)


def test_invalid_configs_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        tiny_config("llama")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        make_random_checkpoint(tiny_config("qwen3_moe", num_experts_per_tok=9), str(tmp_path / "moe"))
    quantized = tiny_config("qwen3", quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(ValueError, match="unquantized"):
        make_random_checkpoint(quantized, str(tmp_path / "q"))
    with pytest.raises(ValueError, match="dtype"):
        make_random_checkpoint(tiny_config("qwen3"), str(tmp_path / "d"), dtype="int8")
    assert not (tmp_path / "moe").exists() and not (tmp_path / "q").exists()


def test_layout_matches_transformers_for_large_configs() -> None:
    """The hand-written hub layout must have exactly transformers' parameter count on real model shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    real = {
        "qwen3_moe": tiny_config("qwen3_moe", hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                                 num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                 moe_intermediate_size=1536, intermediate_size=12288, vocab_size=151936),
        "qwen2": tiny_config("qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
        "qwen3": tiny_config("qwen3", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, intermediate_size=9728, vocab_size=151936,
                             attention_bias=True),
    }
    expected_billions = {"qwen3_moe": 235.1, "qwen2": 7.6, "qwen3": 4.0}
    for arch, cfg in real.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        ours = sum(torch.Size(shape).numel() for _, shape in checkpoint_layout(cfg))
        assert ours == sum(p.numel() for p in model.parameters())
        assert abs(ours / 1e9 - expected_billions[arch]) < 0.1


def test_fill_tokenizer_vocab_makes_every_id_decode(tmp_path) -> None:
    from transformers import AutoTokenizer

    from swiftlm.demo import demo_model_path
    from swiftlm.testing import fill_tokenizer_vocab

    out = fill_tokenizer_vocab(demo_model_path(), str(tmp_path / "tok"), 1100)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 1100
    assert tok.decode([1024, 1099]) == " w1024 w1099"
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.eos_token == "<|im_end|>"
    with pytest.raises(ValueError, match="more than vocab_size"):
        fill_tokenizer_vocab(demo_model_path(), str(tmp_path / "small"), 1000)
