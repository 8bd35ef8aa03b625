"""Detokenizers: the text rules SEDD (Lou et al., 2024) and MDLM (Sahoo et al., 2024) apply to the
zero-shot datasets of the paper's Table 3 before tokenising, so that hdlm's perplexities are
computed on the same text (and hence the same GPT-2 tokens) as theirs.

Each corpus ships pre-tokenised text (spaces around punctuation, ``@-@`` for hyphens in WikiText,
``N`` for numbers and ``<unk>`` in PTB); the rules turn it back into running text. They are
reproduced rule for rule, in the reference order (the order matters: e.g. PTB's ``" 's"`` comes
before ``"s ' "``), including two quirks kept for comparability:

- WikiText's second rule replaces the regex ``/' [0-9]/`` with the *literal* text ``/'[0-9]/``
  (as the reference code does; it practically never matches).
- PTB's ``" N " → " 1 "`` is applied ten times (so that runs like ``N N N`` are all replaced).

Per dataset (the names ``hdlm eval ppl --data`` accepts, :data:`hdlm.evaluation.datasets.ZERO_SHOT`):
PTB → :func:`ptb` (on the stripped line, as the ``ptb_text_only`` dataset serves it), WikiText-2/103
→ :func:`wikitext`, LM1B → :func:`lm1b`, Lambada → :func:`lambada`, PubMed / arXiv (scientific
papers) → :func:`scientific_papers` (WikiText's rules, then LM1B's, as MDLM does), AG News and
OpenWebText → none (neither reference code detokenizes them).

With a detokenizer, every row of the source is a document, an empty one included (it becomes a
lone EOS, as in the reference pipelines, which append EOS to every row).
"""

from __future__ import annotations

import re
from typing import Callable

from .errors import HDLMError

# one rule: (old, new) literal replacement, or (compiled regex, replacement template)
Rule = tuple

_BRACKETS_TIGHT = [(re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"), (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
                   (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"), (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
                   (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'")]

WIKITEXT_RULES: list[Rule] = [
    ("s '", "s'"),  # possessive plural
    (re.compile(r"/' [0-9]/"), r"/'[0-9]/"),  # the reference's literal replacement (see the module docstring)
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),  # number and word separators
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    *_BRACKETS_TIGHT,  # ( x ) -> (x), also [ ], { }, " " and ' '
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),  # section headings
    (" " + chr(176) + " ", chr(176)),  # degree sign
    (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]

PTB_RULES: list[Rule] = [
    (" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/"),
    *[(" N ", " 1 ")] * 10,  # ten passes, as the reference
    ("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?"),
]

LM1B_RULES: list[Rule] = [
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), r"'\1"),  # contractions: " 's" -> "'s"
    (re.compile(r" (\w+) \. "), r" \1. "), (re.compile(r" (\w+) \.$"), r" \1."),
    (" ? ", "? "), (re.compile(r" \?$"), "?"), (" ! ", "! "), (re.compile(r" \!$"), "!"),
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    (re.compile(r"\" ([^\"]+) \""), r'"\1"'), (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^\(\)]+) \)"), r"(\1)"), (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"), ("£ ", "£"),
]


def apply_rules(text: str, rules: list[Rule]) -> str:
    """Apply ``rules`` in order: a (str, str) rule replaces every occurrence, a (regex, template) rule substitutes."""
    for old, new in rules:
        text = old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new)
    return text


def ptb(text: str) -> str:
    """Penn Treebank (Mikolov split) on the stripped line: ``" n't" → "n't"``, ``"<unk>" → "?"``, ``N`` → 1."""
    return apply_rules(text.strip(), PTB_RULES)


def wikitext(text: str) -> str:
    """WikiText-2/103 (raw): ``" @-@ " → "-"``, tight punctuation and brackets, ``"= = =" → "==="``."""
    return apply_rules(text, WIKITEXT_RULES)


def lm1b(text: str) -> str:
    """One Billion Words: URLs, contractions, tight punctuation, quotes and brackets, currency signs."""
    return apply_rules(text, LM1B_RULES)


def lambada(text: str) -> str:
    """LAMBADA (OpenAI's test file): curly double quotes to straight ones, stripped, one leading newline."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_papers(text: str) -> str:
    """PubMed and arXiv articles: the WikiText rules, then the LM1B rules (MDLM)."""
    return lm1b(wikitext(text))


def identity(text: str) -> str:
    return text


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "none": identity, "ptb": ptb, "wikitext": wikitext, "lm1b": lm1b, "lambada": lambada,
    "scientific_papers": scientific_papers,
}


def get_detokenizer(name: str) -> Callable[[str], str]:
    """The detokenizer called ``name`` (one of :data:`hdlm.config.DETOKENIZERS`)."""
    if name not in DETOKENIZERS:
        raise HDLMError(f"detokenizer '{name}': must be one of {', '.join(DETOKENIZERS)}")
    return DETOKENIZERS[name]


__all__ = ["DETOKENIZERS", "apply_rules", "get_detokenizer", "lambada", "lm1b", "ptb", "scientific_papers",
           "wikitext"]
