"""R1-Router Step-GRPO rewards: retrieval steps and answer steps (TRL signature).

R1-Router ("Learning to Route Queries Across Knowledge Bases for Step-wise
Retrieval-Augmented Reasoning"; code OpenBMB/MoRE,
``Easy-R1/verl/utils/reward_score/step.py``) trains one policy on two kinds of
step, each a GRPO group of its own:

* a **retrieval step** writes
  ``<think>...</think><sub-question>...</sub-question><ret>KB</ret>`` with KB one
  of the configured knowledge bases or ``none`` (no more retrieval needed).
  :func:`retrieval_step_reward` is ``0`` when the output does not parse or names
  an unknown KB, else ``0.5 * similarity(sub-question, teacher's sub-question)
  + 0.5 * [KB == teacher's KB]``.
* an **answer step** writes ``<think>...</think><answer>...</answer>``.
  :func:`answer_recall_reward` is the token recall of the gold answer in the
  answer; a gold answer of at most 5 words needs recall 1 to score 1 (else 0).

:func:`step_type_reward` dispatches row by row on the ``step_type`` column
(``"retrieve"`` or ``"answer"``), the offline form of the task: JSONL rows
``{"prompt", "step_type", "reference_query", "reference_kb", "answer", "kbs"}``.

As in MoRE the whole completion is lower-cased before parsing, so tags and KB
names match case-insensitively; the tags are searched for (``re.search``), not
matched against the whole text.  MoRE also accepts a comma-separated KB list:
every name must be known, ``none`` may only stand alone, and the KB term is 1
only for a single KB equal to the teacher's.  That is kept here.

Similarity is pluggable (``similarity=(a, b) -> float``).  MoRE uses BGE-M3
dense embeddings (cosine); the default here, :func:`lexical_similarity`, is the
cosine of word-count vectors and needs nothing to download;
:func:`embedding_similarity` loads a local sentence-embedding model directory.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from .functions import _named, completion_text

__all__ = [
    "STEP_TYPES",
    "Similarity",
    "answer_recall",
    "answer_recall_reward",
    "answer_step_score",
    "embedding_similarity",
    "lexical_similarity",
    "make_retrieval_step_reward",
    "make_step_type_reward",
    "normalize_recall_text",
    "parse_answer_step",
    "parse_retrieval_step",
    "recall_tokens",
    "retrieval_step_reward",
    "retrieval_step_score",
    "step_type_reward",
]

Similarity = Callable[[str, str], float]

STEP_TYPES = ("retrieve", "answer")
# the fields each step type needs in a row (step_type_reward raises when one is missing)
_NEEDS = {"retrieve": ("reference_query", "reference_kb", "kbs"), "answer": ("answer",)}

# ---------------------------------------------------------------------------
# parsers

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_SUBQ = re.compile(r"<sub-question>(.*?)</sub-question>", re.DOTALL | re.IGNORECASE)
_RET = re.compile(r"<ret>(.*?)</ret>", re.DOTALL | re.IGNORECASE)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def parse_retrieval_step(text: str) -> tuple[str, str, str] | None:
    """``(think, sub_question, kb)`` of a retrieval step, stripped; ``None`` unless
    all three tags are present (first occurrence of each, case-insensitive tags).

    ``kb`` is the raw ``<ret>`` content (possibly ``"a, b"``; see the module doc).
    """
    parts = [p.search(text) for p in (_THINK, _SUBQ, _RET)]
    if any(m is None for m in parts):
        return None
    return tuple(m.group(1).strip() for m in parts)  # type: ignore[return-value]


def parse_answer_step(text: str) -> tuple[str, str] | None:
    """``(think, answer)`` of an answer step, stripped; ``None`` unless both tags are present."""
    think, ans = _THINK.search(text), _ANSWER.search(text)
    if think is None or ans is None:
        return None
    return think.group(1).strip(), ans.group(1).strip()


# ---------------------------------------------------------------------------
# similarity

_WORD = re.compile(r"[^\W_]+")


def lexical_similarity(a: str, b: str) -> float:
    """Cosine similarity of the word-count vectors of ``a`` and ``b`` in [0, 1].

    Words are maximal runs of Unicode letters/digits, lower-cased.  Identical
    queries score 1, queries with no word in common 0.  Two texts without any
    word score 1 when their stripped lower-cased forms are equal, else 0.
    """
    ca, cb = Counter(_WORD.findall(a.lower())), Counter(_WORD.findall(b.lower()))
    if not ca or not cb:
        return 1.0 if (not ca and not cb and a.strip().lower() == b.strip().lower()) else 0.0
    dot = sum(n * cb[w] for w, n in ca.items())
    norm = math.sqrt(sum(n * n for n in ca.values()) * sum(n * n for n in cb.values()))
    return min(1.0, dot / norm)


def embedding_similarity(model_dir: str | Path, *, pooling: str = "mean", max_length: int = 512, device: str = "cpu") -> Similarity:
    """A similarity from a local sentence-embedding model directory: the cosine of
    the two texts' embeddings (``AutoModel`` last hidden state, mean-pooled over
    the attention mask, or the first token with ``pooling="cls"`` -- BGE-M3's dense
    vector, MoRE's choice).  Loads with ``local_files_only=True``: never downloads,
    and raises :class:`FileNotFoundError` when ``model_dir`` is not a directory.
    The model is loaded on the first call.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"embedding model directory {str(path)!r} does not exist")
    if pooling not in ("mean", "cls"):
        raise ValueError(f"unknown pooling {pooling!r}; choose 'mean' or 'cls'")
    loaded: list = []

    def similarity(a: str, b: str) -> float:
        import torch

        if not loaded:
            from transformers import AutoModel, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
            loaded.extend((tok, model))
        tok, model = loaded
        batch = tok([a, b], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state.float()
        if pooling == "cls":
            emb = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        emb = torch.nn.functional.normalize(emb, dim=-1)
        return float(emb[0] @ emb[1])

    similarity.__name__ = "embedding_similarity"
    return similarity


# ---------------------------------------------------------------------------
# retrieval step


def _kb_names(kbs: Any, where: str) -> set[str]:
    if isinstance(kbs, str):
        raise ValueError(f"{where}: kbs must be a list of knowledge-base names, got the string {kbs!r}")
    return {str(k).strip().lower() for k in kbs}


def retrieval_step_score(text: str, reference_query: str, reference_kb: str, kbs: Sequence[str], similarity: Similarity = lexical_similarity) -> float:
    """The retrieval-step reward of one completion text (see :func:`retrieval_step_reward`)."""
    parsed = parse_retrieval_step(text.lower())
    if parsed is None:
        return 0.0
    _, query, kb = parsed
    known = _kb_names(kbs, "retrieval_step_score") | {"none"}
    chosen = [k.strip() for k in kb.split(",")]
    if any(k not in known for k in chosen) or ("none" in chosen and len(chosen) > 1):
        return 0.0
    kb_term = 1.0 if (len(chosen) == 1 and chosen[0] == str(reference_kb).strip().lower()) else 0.0
    return 0.5 * float(similarity(query, str(reference_query))) + 0.5 * kb_term


def _rows_of_kbs(kbs: Any, n: int) -> list:
    """``kbs`` as one value per completion: a list of names applies to every row,
    a list of lists (a dataset column) is per row."""
    if kbs is None:
        return [None] * n
    if isinstance(kbs, str):
        raise ValueError(f"kbs must be a list of knowledge-base names (or one list per completion), got the string {kbs!r}")
    kbs = list(kbs)
    if kbs and all(isinstance(k, str) for k in kbs):
        return [kbs] * n
    if len(kbs) != n:
        raise ValueError(f"column 'kbs' has {len(kbs)} values for {n} completions")
    return kbs


def _column(values: Any, n: int, name: str) -> list:
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes)):
        raise ValueError(f"column {name!r} must hold one value per completion, got a single string")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return values


def _missing(i: int, field: str, step: str) -> ValueError:
    return ValueError(f"row {i}: {step} step has no {field!r}")


def retrieval_step_reward(
    prompts: Sequence | None,
    completions: Sequence,
    reference_query: Sequence | None = None,
    reference_kb: Sequence | None = None,
    kbs: Sequence | None = None,
    *,
    similarity: Similarity | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """R1-Router's retrieval-step reward (MoRE ``ret_accuracy_reward``).

    ``0`` when the completion lacks one of ``<think>``, ``<sub-question>``,
    ``<ret>`` or names a KB outside ``kbs`` (``none`` is always allowed), else
    ``0.5 * similarity(sub_question, reference_query) + 0.5 * [kb == reference_kb]``
    (case-insensitive KB names).  ``kbs``: the configured KB names, one list for
    all rows or one per row.  ``similarity`` defaults to :func:`lexical_similarity`;
    its value is used as is (not clipped, as in MoRE).

    ``None`` for a row with neither ``reference_query`` nor ``reference_kb`` (not a
    retrieval step); a row with only one of them, or without ``kbs``, raises.
    """
    sim = similarity or lexical_similarity
    n = len(completions)
    queries, refs, kb_rows = _column(reference_query, n, "reference_query"), _column(reference_kb, n, "reference_kb"), _rows_of_kbs(kbs, n)
    out: list[float | None] = []
    for i in range(n):
        if queries[i] is None and refs[i] is None:
            out.append(None)
            continue
        for field, value in (("reference_query", queries[i]), ("reference_kb", refs[i]), ("kbs", kb_rows[i])):
            if value is None:
                raise _missing(i, field, "retrieve")
        out.append(retrieval_step_score(completion_text(completions[i]), queries[i], refs[i], kb_rows[i], sim))
    return out


# ---------------------------------------------------------------------------
# answer step

# MoRE normalises both sides with the VQA evaluation script's steps (processPunctuation,
# processDigitArticle), then tokenises (nltk word_tokenize) and drops punctuation tokens.
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"an", "the"}  # MoRE's list: 'a' is kept (the VQA original also drops 'a')
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!]")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_TOKEN = re.compile(r"\d+(?:\.\d+)*|[^\W_]+(?:'[^\W_]+)*|[^\w\s]")
_DROP_TOKENS = set(",.?!:;'\"")


def normalize_recall_text(s: str) -> str:
    """MoRE's answer normalisation (VQA-evaluation style), applied to answer and gold alike:

    lower-case; ``,`` between digits removed (``1,000`` -> ``1000``); the characters
    ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` become spaces; a ``.`` not followed
    by a digit is removed (``U.S.`` -> ``us``, ``3.5`` stays); number words
    ``zero``..``ten`` (and ``none``) become digits; the articles ``an`` and ``the``
    are dropped (MoRE's list; ``a`` stays).  Simplification: MoRE removes a
    punctuation character instead of spacing it when it already stands next to a
    space, and expands contractions written without an apostrophe.
    """
    s = s.lower().replace("\n", " ").replace("\t", " ").strip()
    s = _DIGIT_COMMA.sub("", s)
    s = _PUNCT.sub(" ", s)
    s = _PERIOD.sub("", s)
    words = [_NUMBERS.get(w, w) for w in s.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def recall_tokens(s: str) -> list[str]:
    """Tokens of :func:`normalize_recall_text` (``s``): words (with inner apostrophes),
    numbers (``3.5``) and single symbols, without the tokens ``, . ? ! : ; ' "``
    (MoRE uses nltk's ``word_tokenize``; this regex stands in for it)."""
    return [t for t in _TOKEN.findall(normalize_recall_text(s)) if t not in _DROP_TOKENS]


def _recall_f1(gold: list[str], pred: list[str]) -> tuple[float, float]:
    same = sum((Counter(gold) & Counter(pred)).values())
    if not gold or not pred or same == 0:
        return 0.0, 0.0
    p, r = same / len(pred), same / len(gold)
    return r, 2 * p * r / (p + r)


def answer_recall(pred: str, golds: Sequence[str]) -> float:
    """Token recall of the best gold answer in ``pred``: the recall of the gold with
    the highest token F1 (the first on ties; 0 when none overlaps), as MoRE's
    ``evaluate``."""
    pred_toks = recall_tokens(pred)
    best_f1, best_recall = 0.0, 0.0
    for g in golds:
        recall, f1 = _recall_f1(recall_tokens(str(g)), pred_toks)
        if f1 > best_f1:
            best_f1, best_recall = f1, recall
    return best_recall


def _golds(answer: Any) -> list[str]:
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]


def answer_step_score(text: str, answer: str | Sequence[str]) -> float:
    """The answer-step reward of one completion text (see :func:`answer_recall_reward`)."""
    parsed = parse_answer_step(text.lower())
    if parsed is None:
        return 0.0
    golds = _golds(answer)
    if not golds:
        raise ValueError("answer: empty list of gold answers")
    recall = answer_recall(parsed[1], golds)
    if len(golds) == 1 and len(golds[0].split()) > 5:
        return recall
    return 1.0 if recall == 1.0 else 0.0


def answer_recall_reward(prompts: Sequence | None, completions: Sequence, answer: Sequence | None = None, **kwargs: Any) -> list[float | None]:
    """R1-Router's answer-step reward (MoRE ``ans_accuracy_reward``).

    ``0`` when the completion lacks ``<think>`` or ``<answer>``; else the token
    recall of the gold answer in the ``<answer>`` text (normalised by
    :func:`normalize_recall_text`, tokenised by :func:`recall_tokens`).  A gold
    answer of at most 5 (whitespace-separated, raw) words scores 1 only at recall 1,
    else 0; a longer one scores the recall.  A row's ``answer`` may be a list of
    gold answers: the best one by F1 counts and, as in MoRE, recall must then be 1.

    ``None`` for a row without ``answer`` (not an answer step).
    """
    n = len(completions)
    golds = _column(answer, n, "answer")
    return [None if golds[i] is None else answer_step_score(completion_text(completions[i]), golds[i]) for i in range(n)]


# ---------------------------------------------------------------------------
# dispatch


def step_type_reward(
    prompts: Sequence | None,
    completions: Sequence,
    step_type: Sequence | None = None,
    *,
    similarity: Similarity | None = None,
    kbs: Sequence | None = None,
    **columns: Any,
) -> list[float]:
    """Per-row dispatch on ``step_type``: ``"retrieve"`` rows get
    :func:`retrieval_step_reward` (needing ``reference_query``, ``reference_kb``,
    ``kbs``), ``"answer"`` rows :func:`answer_recall_reward` (needing ``answer``).
    A missing field, or an unknown step type, raises ``ValueError`` naming the row.
    """
    n = len(completions)
    if step_type is None:
        raise ValueError("step_type_reward needs the 'step_type' column")
    types = _column(step_type, n, "step_type")
    cols = {"reference_query": _column(columns.get("reference_query"), n, "reference_query"),
            "reference_kb": _column(columns.get("reference_kb"), n, "reference_kb"),
            "kbs": _rows_of_kbs(kbs, n),
            "answer": _column(columns.get("answer"), n, "answer")}  # fmt: skip
    sim = similarity or lexical_similarity
    out: list[float] = []
    for i in range(n):
        st = types[i]
        if st not in _NEEDS:
            raise ValueError(f"row {i}: unknown step_type {st!r}; choose one of {STEP_TYPES}")
        for field in _NEEDS[st]:
            if cols[field][i] is None:
                raise _missing(i, field, st)
        text = completion_text(completions[i])
        if st == "retrieve":
            out.append(retrieval_step_score(text, cols["reference_query"][i], cols["reference_kb"][i], cols["kbs"][i], sim))
        else:
            out.append(answer_step_score(text, cols["answer"][i]))
    return out


# ---------------------------------------------------------------------------
# factories


def make_retrieval_step_reward(*, kbs: Sequence[str] | None = None, similarity: Similarity | None = None, name: str = "retrieval_step"):
    """:func:`retrieval_step_reward` with fixed options; ``kbs`` here is used for rows
    whose ``kbs`` column is missing."""
    fixed = kbs

    def retrieval_step(prompts, completions, reference_query=None, reference_kb=None, kbs=None, **kwargs):
        return retrieval_step_reward(prompts, completions, reference_query, reference_kb, fixed if kbs is None else kbs, similarity=similarity, **kwargs)

    return _named(retrieval_step, name, retrieval_step_reward)


def make_step_type_reward(*, kbs: Sequence[str] | None = None, similarity: Similarity | None = None, name: str = "step_type"):
    """:func:`step_type_reward` with fixed options (``kbs`` as in
    :func:`make_retrieval_step_reward`)."""
    fixed = kbs

    def step_type_(prompts, completions, step_type=None, kbs=None, **columns):
        return step_type_reward(prompts, completions, step_type, similarity=similarity, kbs=fixed if kbs is None else kbs, **columns)

    return _named(step_type_, name, step_type_reward)
