"""GPT-2 folders in the Hugging Face layout, built here from scratch: loaded, checked, decoded.

The folder is written exactly as transformers stores GPT-2 (names, [in, out] Conv1D matrices, the
attn.bias mask buffers, a tied or absent lm_head), in both weight formats, with a tiny byte-level
BPE in GPT-2's vocab.json/merges.txt spelling. An independent forward over the raw HF tensors
(x @ W + b, as Conv1D computes it) is the reference the loaded model must match.
"""

import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

import minispec
from minispec import masks
from minispec.errors import MinispecError
from minispec.gpt2 import byte_decoder
from tests.helpers import run_script

C, N_LAYER, N_HEAD, N_POS = 32, 2, 2, 64
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]
VOCAB = 256 + len(MERGES) + 1  # bytes, merges, <|endoftext|>


def bytes_to_unicode():
    """GPT-2's byte -> printable character table, written the way OpenAI's encoder.py writes it."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def hf_config(**changes):
    """config.json as transformers writes it for gpt2, at a tiny size."""
    return {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
            "bos_token_id": VOCAB - 1, "embd_pdrop": 0.1, "eos_token_id": VOCAB - 1, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": N_POS, "n_embd": C, "n_head": N_HEAD,
            "n_inner": None, "n_layer": N_LAYER, "n_positions": N_POS, "reorder_and_upcast_attn": False,
            "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
            "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
            "summary_type": "cls_index", "summary_use_proj": True, "torch_dtype": "float32",
            "transformers_version": "4.40.0", "use_cache": True, "vocab_size": VOCAB, **changes}


def hf_tensors(seed=0):
    """Random GPT-2 weights under GPT2Model's names; Conv1D matrices are [in, out]."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    t = {"wte.weight": rand(VOCAB, C), "wpe.weight": rand(N_POS, C, std=0.1)}
    for i in range(N_LAYER):
        for ln in ("ln_1", "ln_2"):
            t[f"h.{i}.{ln}.weight"], t[f"h.{i}.{ln}.bias"] = 1 + rand(C, std=0.1), rand(C, std=0.1)
        t[f"h.{i}.attn.c_attn.weight"], t[f"h.{i}.attn.c_attn.bias"] = rand(C, 3 * C), rand(3 * C)
        t[f"h.{i}.attn.c_proj.weight"], t[f"h.{i}.attn.c_proj.bias"] = rand(C, C), rand(C)
        t[f"h.{i}.mlp.c_fc.weight"], t[f"h.{i}.mlp.c_fc.bias"] = rand(C, 4 * C), rand(4 * C)
        t[f"h.{i}.mlp.c_proj.weight"], t[f"h.{i}.mlp.c_proj.bias"] = rand(4 * C, C, std=0.15), rand(C)
    t["ln_f.weight"], t["ln_f.bias"] = 1 + rand(C, std=0.1), rand(C, std=0.1)
    return t


def write_safetensors(path, tensors, dtype=torch.float32):
    """The safetensors format by hand: u64 header length, JSON header, raw little-endian bytes."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.bool: "BOOL"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        t = t if t.dtype == torch.bool else t.to(dtype)
        blob = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the reference writer pads the header to a multiple of 8 bytes
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_folder(folder, fmt="safetensors", tensors=None, config=None, dtype=torch.float32):
    """A complete GPT-2 folder. safetensors: bare names, attn.bias as F32, no lm_head (as the gpt2
    repo stores it); bin: GPT2LMHeadModel's state_dict, "transformer." names, bool attn.bias, lm_head."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors() if tensors is None else tensors
    (folder / "config.json").write_text(json.dumps(config or hf_config(), indent=2))
    spell = bytes_to_unicode()
    vocab = {spell[b]: i for i, b in enumerate(spell)}  # GPT-2 numbers single bytes in the table's order
    vocab |= {a + b: 256 + i for i, (a, b) in enumerate(MERGES)} | {"<|endoftext|>": VOCAB - 1}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    mask = torch.ones(N_POS, N_POS, dtype=torch.bool).tril().view(1, 1, N_POS, N_POS)
    if fmt == "safetensors":
        buffers = {f"h.{i}.attn.bias": mask.float() for i in range(N_LAYER)}
        write_safetensors(folder / "model.safetensors", tensors | buffers, dtype)
    else:
        state = {"transformer." + k: v.to(dtype) for k, v in tensors.items()}
        state |= {f"transformer.h.{i}.attn.bias": mask for i in range(N_LAYER)}
        torch.save(state | {"lm_head.weight": state["transformer.wte.weight"]}, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


def reference_logits(t, ids):
    """GPT-2's forward written from the HF tensors alone, Conv1D as x @ W + b. ids (T,) -> (T, V)."""
    T, hs = len(ids), C // N_HEAD
    x = t["wte.weight"][ids] + t["wpe.weight"][:T]

    def ln(x, name):
        return F.layer_norm(x, (C,), t[name + ".weight"], t[name + ".bias"], eps=1e-5)

    def conv1d(x, name):
        return x @ t[name + ".weight"] + t[name + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    causal = torch.ones(T, T).tril().bool()
    for i in range(N_LAYER):
        q, k, v = conv1d(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn").split(C, dim=-1)
        q, k, v = (a.view(T, N_HEAD, hs).transpose(0, 1) for a in (q, k, v))  # (nh, T, hs)
        att = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + conv1d((att @ v).transpose(0, 1).reshape(T, C), f"h.{i}.attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ t["wte.weight"].T


def logits_of(model, ids):
    T = len(ids)
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(T), masks.causal(T))[0][0]


IDS = [258, 78, 261, 75, 67, 0, 220, 5, 100, 262, 3]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_logits_equal_an_independent_forward(tmp_path, fmt):
    model, tok = minispec.load_gpt2(write_folder(tmp_path / fmt, fmt))
    assert model.config == minispec.GPTConfig(block_size=N_POS, vocab_size=VOCAB, n_layer=N_LAYER, n_head=N_HEAD,
                                              n_embd=C)
    assert model.lm_head.weight is model.transformer.wte.weight
    ref = reference_logits(hf_tensors(), IDS)
    assert ref.std() > 1  # far from uniform: a transposed matrix could not hide in the tolerance
    torch.testing.assert_close(logits_of(model, IDS), ref, atol=1e-4, rtol=1e-4)


def test_both_formats_give_the_same_model(tmp_path):
    a, _ = minispec.load_gpt2(write_folder(tmp_path / "st", "safetensors"))
    b, _ = minispec.load_gpt2(write_folder(tmp_path / "bin", "bin"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(tmp_path, dtype):
    model, _ = minispec.load_gpt2(write_folder(tmp_path / "half", dtype=dtype))
    rounded = {k: v.to(dtype).float() for k, v in hf_tensors().items()}  # what the file holds, exactly
    torch.testing.assert_close(logits_of(model, IDS), reference_logits(rounded, IDS), atol=1e-4, rtol=1e-4)
    half, _ = minispec.load_gpt2(tmp_path / "half", dtype=dtype)
    assert half.transformer.wte.weight.dtype == dtype


def test_tokenizer_from_vocab_and_merges(gpt2_dir):
    _, tok = minispec.load_gpt2(gpt2_dir)
    assert byte_decoder() == {c: b for b, c in bytes_to_unicode().items()}
    assert tok.n_vocab == VOCAB and tok.eot_token == VOCAB - 1
    # "hello": he(256) + ll(257) -> hell(258), then "o"; " world": Ġw(259), or(260) -> Ġwor(261), "l", "d".
    # Single bytes are numbered in GPT-2's table order: "!" is 0, "o" is 111 - 33 = 78, " " is 220.
    assert tok.encode("hello world") == [258, 78, 261, 75, 67]
    assert tok.encode("!") == [0] and tok.encode(" ") == [220]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [VOCAB - 1]
    text = "héllo wörld ✓\n\tdef f(x): return x"
    assert tok.decode(tok.encode(text)) == text


def test_generate_matches_greedy_reference(gpt2_dir):
    model, tok = minispec.load_gpt2(gpt2_dir)
    prompt = tok.encode("hello world")
    res = minispec.generate(model, prompt, max_new_tokens=8, temperature=0.0)
    seq, t = list(prompt), hf_tensors()
    for _ in range(8):
        seq.append(int(reference_logits(t, seq)[-1].argmax()))
    assert res.tokens == seq[len(prompt):]


def broken(folder, what):
    """Damage one thing in a good folder."""
    if what == "no config":
        (folder / "config.json").unlink()
    elif what == "no vocab":
        (folder / "vocab.json").unlink()
    elif what == "no merges":
        (folder / "merges.txt").unlink()
    elif what == "no weights":
        (folder / "model.safetensors").unlink()
    elif what == "not gpt2":
        (folder / "config.json").write_text(json.dumps(hf_config(model_type="llama")))
    elif what == "missing key":
        cfg = hf_config()
        del cfg["n_head"]
        (folder / "config.json").write_text(json.dumps(cfg))
    elif what == "relu":
        (folder / "config.json").write_text(json.dumps(hf_config(activation_function="relu")))
    elif what == "bad json":
        (folder / "config.json").write_text("{not json")
    elif what == "config vocab":
        (folder / "config.json").write_text(json.dumps(hf_config(vocab_size=VOCAB + 5)))
    elif what == "weights vocab":
        t = hf_tensors()
        t["wte.weight"] = t["wte.weight"][:-5]
        write_safetensors(folder / "model.safetensors", t)
    elif what == "linear orientation":
        t = hf_tensors()
        t["h.1.mlp.c_fc.weight"] = t["h.1.mlp.c_fc.weight"].T.contiguous()
        write_safetensors(folder / "model.safetensors", t)
    elif what == "missing tensor":
        t = hf_tensors()
        del t["h.1.ln_2.bias"]
        write_safetensors(folder / "model.safetensors", t)
    elif what == "untied head":
        write_safetensors(folder / "model.safetensors", hf_tensors() | {"lm_head.weight": torch.zeros(VOCAB, C)})
    elif what == "garbage weights":
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    elif what == "merges out of order":
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES[::-1]))
    return folder


@pytest.mark.parametrize("what, words", [
    ("no config", ["config.json is missing", "merges.txt"]),
    ("no vocab", ["vocab.json is missing"]),
    ("no merges", ["merges.txt is missing"]),
    ("no weights", ["no model.safetensors or pytorch_model.bin"]),
    ("not gpt2", ["'llama'", "not GPT-2"]),
    ("missing key", ["n_head"]),
    ("relu", ["activation_function", "relu"]),
    ("bad json", ["config.json", "JSON"]),
    ("config vocab", ["vocab_size", str(VOCAB + 5), str(VOCAB)]),
    ("weights vocab", ["wte.weight", f"[{VOCAB - 5}, {C}]", f"[{VOCAB}, {C}]"]),
    ("linear orientation", ["h.1.mlp.c_fc.weight", f"[{4 * C}, {C}]", f"[{C}, {4 * C}]"]),
    ("missing tensor", ["lacks h.1.ln_2.bias"]),
    ("untied head", ["lm_head.weight", "ties"]),
    ("garbage weights", ["not a valid safetensors file"]),
    ("merges out of order", ["disagree"]),
])
def test_bad_folder_is_one_clear_error(tmp_path, what, words):
    folder = broken(write_folder(tmp_path / "g"), what)
    with pytest.raises(MinispecError) as e:
        minispec.load_gpt2(folder)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_no_folder():
    with pytest.raises(MinispecError, match="no GPT-2 folder"):
        minispec.load_gpt2("/nonexistent/gpt2")


def one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_decode_cli_on_a_gpt2_folder(gpt2_dir, tmp_path):
    proc = run_script("decode.py", "--gpt2", gpt2_dir, "--method", "ar", "--max-new-tokens", "8", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The meaning of life is") and "tokens/s" in proc.stdout  # the default prompt
    out = tmp_path / "r.json"
    proc = run_script("decode.py", "--gpt2", gpt2_dir, "--prompt", "hello world", "--max-new-tokens", "8",
                      "--device", "cpu", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "draft_model" in proc.stdout and "trained" in proc.stdout  # said to be skipped, and why
    methods = [r["method"] for r in json.loads(out.read_text())["methods"]]
    assert "ar" in methods and "draft_model" not in methods


def test_decode_cli_bad_gpt2_input(tmp_path, gpt2_dir):
    one_line_error(run_script("decode.py", "--gpt2", broken(write_folder(tmp_path / "g"), "not gpt2")), "not GPT-2")
    one_line_error(run_script("decode.py", "--gpt2", gpt2_dir, "--ckpt", tmp_path), "--gpt2")
    one_line_error(run_script("decode.py", "--gpt2", gpt2_dir, "--method", "draft_model", "--max-new-tokens", "8"),
                   "draft_model")


def test_train_drafters_against_a_gpt2_folder(gpt2_dir, tmp_path):
    """train_tiny.py --init-from: the folder's GPT-2 is the target (not retrained), and the trained
    drafters that come out of it decode losslessly against it."""
    words = "the cat sat on a mat and said hello world to small models in short sentences".split()
    text = "\n".join(" ".join(words[(7 * i + 3 * j) % len(words)] for j in range(12)) for i in range(1500))
    (tmp_path / "corpus.txt").write_text(text)
    out = tmp_path / "out"
    proc = run_script("train_tiny.py", "--preset", "test", "--init-from", gpt2_dir, "--data", tmp_path / "corpus.txt",
                      "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, tok = minispec.load(out)
    gpt2, _ = minispec.load_gpt2(gpt2_dir)
    for (name, p), q in zip(model.state_dict().items(), gpt2.state_dict().values()):
        assert torch.equal(p, q), name
    prompt = tok.encode("hello world")
    greedy = minispec.generate(model, prompt, 16).tokens
    drafter = minispec.make_drafter("draft_model", model, ckpt=out, k=4)
    assert minispec.generate(model, prompt, 16, drafter).tokens == greedy
