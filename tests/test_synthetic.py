"""The synthetic Markov source (hdlm.synthetic) against independent references: brute-force
enumeration of every stream of a tiny chain, Monte-Carlo estimates, hdlm's own data pipeline."""

import itertools
import math

import numpy as np
import pytest

from hdlm.data import load_token_stream, pack_blocks
from hdlm.errors import HDLMError
from hdlm.synthetic import (EOS, UNK, MarkovSource, allowed_fraction, block_marginals, document_text, entropy_rate,
                            load_source, load_stream, random_markov_source, reference_nll, sample_documents,
                            sequence_nll, stationary, write_corpus)
from hdlm.tokenizers import load_tokenizer

# A tiny chain over EOS, a, b that mixes slowly (the marginals at block starts differ from π).
TINY_P = np.array([[0.0, 0.7, 0.3],    # EOS -> a document's first word
                   [0.1, 0.8, 0.1],    # a
                   [0.3, 0.0, 0.7]])   # b (b -> a is forbidden)


def tiny_source() -> MarkovSource:
    return MarkovSource(TINY_P, (EOS, "a", "b"), eos_id=0)


def enumerated_stream(P: np.ndarray, length: int) -> dict[tuple, float]:
    """P(stream[0:length] = x) for every x, multiplying along the chain from a virtual EOS (id 0)."""
    probs = {}
    for x in itertools.product(range(P.shape[0]), repeat=length):
        p, prev = 1.0, 0
        for tok in x:
            p *= P[prev, tok]
            prev = tok
        probs[x] = p
    return probs


def test_packing_limit_equals_enumerated_block_marginal():
    # The attainable limit of block k is -log P(stream[kd:(k+1)d] = block), the stream's own
    # marginal summed over every prefix: catches a wrong power of P (kd vs kd + 1), a start
    # distribution other than P[EOS], or a marginal that ignores the block's offset.
    src, d = tiny_source(), 3
    for k in range(3):
        joint = enumerated_stream(TINY_P, (k + 1) * d)
        marginal: dict[tuple, float] = {}
        for x, p in joint.items():
            marginal[x[k * d:]] = marginal.get(x[k * d:], 0.0) + p
        assert sum(marginal.values()) == pytest.approx(1.0, abs=1e-12)
        filler = np.zeros((k, d), dtype=np.int64)  # blocks before k do not enter block k's limit
        got_total = 0.0
        for block, p in marginal.items():
            limit = reference_nll(src, np.vstack([filler, [block]]))["limit"][k]
            if p == 0:
                assert limit == math.inf
            else:
                assert limit == pytest.approx(-math.log(p), rel=1e-12)
                got_total += math.exp(-limit)
        assert got_total == pytest.approx(1.0, abs=1e-12)


def test_source_nll_with_context_is_the_stream_log_probability():
    # Block by block with the true context the NLLs add up to -log P(stream): catches a block
    # whose first token is scored without (or with the wrong) preceding token.
    src, d = tiny_source(), 2
    joint = enumerated_stream(TINY_P, 3 * d)
    for x, p in list(joint.items())[::37]:
        if p == 0:
            continue
        blocks = np.array(x).reshape(3, d)
        assert reference_nll(src, blocks)["source"].sum() == pytest.approx(-math.log(p), rel=1e-12)
    # and the limit never beats the source with context on a block whose context helps
    blocks = np.array([[1, 1], [2, 2]])  # "b" after "a" is rare; m_1 puts more mass on b
    r = reference_nll(src, blocks)
    assert r["source"][0] == r["limit"][0]  # block 0 starts the stream: same first-token law


def test_block_marginals_match_monte_carlo_streams():
    # m_k against the empirical law of stream token kd over independent sampled streams:
    # catches a sampler whose streams do not start at a virtual EOS, and a wrong m_k.
    src, d, n = tiny_source(), 2, 3000
    firsts = np.array([np.concatenate(sample_documents(src, 2 * d + 1, seed=s, batch=8))[[0, d, 2 * d]]
                       for s in range(n)])
    m = block_marginals(src, d, 3)
    for k in range(3):
        freq = np.bincount(firsts[:, k], minlength=3) / n
        tol = 5 * np.sqrt(m[k] * (1 - m[k]) / n) + 1e-9
        assert (np.abs(freq - m[k]) <= tol).all(), (k, freq, m[k])
    assert not np.allclose(m[1], stationary(src), atol=1e-3)  # the test would be blind at stationarity


def test_sampled_transitions_follow_the_chain():
    # Empirical transition frequencies of a long stream against P (z-scores), documents end with
    # exactly one EOS and are never empty: catches an off-by-one in the inverse CDF.
    src = tiny_source()
    docs = sample_documents(src, 200_000, seed=3)
    assert all(len(doc) >= 2 and doc[-1] == 0 and (doc[:-1] != 0).all() for doc in docs)
    stream = np.concatenate(docs)
    assert sum(map(len, docs)) >= 200_000 and len(stream) - 200_000 < max(map(len, docs))
    prev = np.concatenate([[0], stream[:-1]])
    counts = np.zeros((3, 3))
    np.add.at(counts, (prev, stream), 1)
    n_rows = counts.sum(1, keepdims=True)
    z = np.abs(counts / n_rows - TINY_P) / np.sqrt(TINY_P * (1 - TINY_P) / n_rows + 1e-12)
    assert (z < 5).all()
    assert counts[2, 1] == 0  # forbidden transitions never happen


def test_entropy_rate_against_power_iteration_and_a_long_stream():
    src = random_markov_source(40, seed=5)
    pi = stationary(src)
    power = np.linalg.matrix_power(src.transition, 2000)[src.eos_id]
    np.testing.assert_allclose(pi, power, atol=1e-10)
    stream = np.concatenate(sample_documents(src, 200_000, seed=1))
    nll = sequence_nll(src, stream, src.start) / len(stream)
    assert entropy_rate(src) == pytest.approx(nll, abs=0.02)


def test_random_source_shape_and_seeding():
    src = random_markov_source(50, branching=(2, 4), mean_length=10, seed=7)
    P = src.transition
    assert src.N == 52 and src.words[:2] == (EOS, UNK) and src.eos_id == 0
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-12)
    assert P[0, 0] == 0 and ((P[2:] > 0).sum(1) <= 5).all()  # at most 4 successors + EOS
    assert not src.emitted[1] and src.emitted[0]  # [UNK] is never produced
    np.testing.assert_array_equal(P, random_markov_source(50, branching=(2, 4), mean_length=10, seed=7).transition)
    assert not np.array_equal(P, random_markov_source(50, branching=(2, 4), mean_length=10, seed=8).transition)
    lengths = [len(doc) for doc in sample_documents(src, 50_000, seed=0)]
    assert 8 < np.mean(lengths) < 13  # words ~ 10 on average, plus the EOS


def test_sequence_nll_is_infinite_on_a_forbidden_transition():
    src = tiny_source()
    assert sequence_nll(src, np.array([1, 2, 1]), src.start) == math.inf
    assert sequence_nll(src, np.array([1, 1]), src.start) == pytest.approx(-math.log(0.7 * 0.8))


def test_allowed_fraction_on_hand_built_sequences():
    src = random_markov_source(10, branching=(1, 1), seed=0)
    P = src.transition
    a = int(np.argmax(P[0]))  # the one word that starts documents (n_words / 10 = 1)
    b = int(np.flatnonzero(P[a, 2:] > 0)[0]) + 2  # a's only successor word
    c = next(w for w in range(2, src.N) if P[a, w] == 0 and P[0, w] == 0)
    assert allowed_fraction(src, [[a, b]]) == (1, 1)
    assert allowed_fraction(src, [[a, c]]) == (0, 1)
    assert allowed_fraction(src, [[a, 0]]) == (1, 1)  # a word may end its document
    assert allowed_fraction(src, [[a, b, 0, a], [a, c]]) == (3, 4)  # EOS -> a: a starts documents
    assert allowed_fraction(src, [[0, c]]) == (0, 1)  # ... and c does not
    assert allowed_fraction(src, [[a, src.N], [src.N, a]]) == (0, 2)  # MASK is never allowed
    assert allowed_fraction(src, [[1, a]]) == (0, 1)  # [UNK] is never emitted, nor what follows it
    assert allowed_fraction(src, [[a], []]) == (0, 0)


def test_corpus_tokens_through_hdlm_pipeline_are_the_source_tokens(tmp_path):
    # The "same test tokens" claim: what hdlm's tokenizer + packing make of the written files is
    # the stream the source sampled, document boundaries and EOS included.
    src = random_markov_source(30, seed=2)
    folder = tmp_path / "corpus"
    manifest = write_corpus(src, folder, {"train": 3000, "valid": 500, "test": 700}, seed=4)
    tok = load_tokenizer(str(folder))
    assert tok.vocab_size == src.N and tok.eos_id == src.eos_id
    for split in ("train", "valid", "test"):
        stream = np.asarray(load_token_stream(str(folder / "{split}.txt"), split, tok, cache_dir=tmp_path / "cache"))
        np.testing.assert_array_equal(stream, load_stream(folder, split))
        assert len(stream) == manifest["splits"][split]["tokens"]
        np.testing.assert_array_equal(pack_blocks(stream, 16)[1], stream[16:32])
    assert load_source(folder).words == src.words
    np.testing.assert_array_equal(load_source(folder).transition, src.transition)
    assert not np.array_equal(load_stream(folder, "valid")[:50], load_stream(folder, "test")[:50])


def test_tokenizer_round_trip(tmp_path):
    src = random_markov_source(20, seed=1)
    write_corpus(src, tmp_path, {"test": 200}, seed=0)
    tok = load_tokenizer(str(tmp_path))
    for doc in sample_documents(src, 300, seed=9):
        text = document_text(src, doc)
        assert tok.encode(text) == doc[:-1].tolist()
        assert tok.decode(doc.tolist()) == text + " " + EOS
    assert tok.decode([2, tok.mask_id]) == f"{src.words[2]} [MASK]"


def test_write_corpus_reuses_a_complete_folder_and_redoes_a_changed_one(tmp_path):
    src = random_markov_source(20, seed=1)
    write_corpus(src, tmp_path, {"test": 200}, seed=0)
    mtime = (tmp_path / "test.txt").stat().st_mtime_ns
    first = load_stream(tmp_path, "test")
    write_corpus(src, tmp_path, {"test": 200}, seed=0)
    assert (tmp_path / "test.txt").stat().st_mtime_ns == mtime  # not rewritten: the token cache stays valid
    write_corpus(src, tmp_path, {"test": 200}, seed=1)
    assert not np.array_equal(load_stream(tmp_path, "test")[:40], first[:40])
    (tmp_path / "corpus.json").unlink()  # an interrupted write is not trusted
    with pytest.raises(HDLMError, match="incomplete"):
        load_source(tmp_path)


@pytest.mark.parametrize("P, words, eos, match", [
    (TINY_P[:2], (EOS, "a", "b"), 0, "shape"),
    (TINY_P * 1.1, (EOS, "a", "b"), 0, "distribution"),
    (np.eye(3), (EOS, "a", "b"), 0, "EOS, EOS"),
    (TINY_P, (EOS, "a", "a"), 0, "distinct"),
    (TINY_P, (EOS, "a b", "c"), 0, "whitespace"),
    (TINY_P, ("x", "a", "b"), 0, "eos_id"),
])
def test_bad_sources_raise_one_clear_error(P, words, eos, match):
    with pytest.raises(HDLMError, match=match):
        MarkovSource(P, words, eos_id=eos)


def test_inverse_cdf_never_lands_on_a_zero_probability_token_after_rounding():
    # ten 0.1s cumsum to 0.9999999999999999 = the largest u < 1: a plain cumsum would then pick the
    # trailing zero-probability token (a forbidden transition in the corpus)
    from hdlm.synthetic import _inverse_cdf_table

    P = np.array([[0.1] * 10 + [0.0]])
    u = np.nextafter(1.0, 0.0)
    assert np.cumsum(P[0])[9] <= u  # the hazard is real
    assert (_inverse_cdf_table(P)[0] <= u).sum() == 9  # token 9, the last positive one
