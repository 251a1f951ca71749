"""R1-Router Step-GRPO rewards (fastgrpo.rewards.retrieval), hand-worked cases."""

import pytest

import fastgrpo.rewards as R
from fastgrpo.rewards import retrieval as RR

KBS = ["text", "table"]


def ret(query, kb, think="reason"):
    return f"<think>{think}</think><sub-question>{query}</sub-question><ret>{kb}</ret>"


def ans(answer, think="reason"):
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def rscore(completion, query="Where does Ann live?", kb="text", kbs=KBS, **kw):
    return R.retrieval_step_reward(None, [completion], [query], [kb], kbs, **kw)[0]


def ascore(completion, gold):
    return R.answer_recall_reward(None, [completion], [gold])[0]


# ---------------------------------------------------------------------------
# parsers


def test_parse_retrieval_step():
    assert R.parse_retrieval_step(ret(" Who? ", " Text ", " t ")) == ("t", "Who?", "Text")
    assert R.parse_retrieval_step("<THINK>a</THINK><Sub-Question>b</Sub-Question><RET>c</RET>") == ("a", "b", "c")
    multi = "<think>a\nb</think>\n<sub-question>\nq\n</sub-question>\n<ret>\ntable\n</ret>"
    assert R.parse_retrieval_step(multi) == ("a\nb", "q", "table")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<sub-question>q</sub-question><ret>text</ret>",  # no think
        "<think>t</think><ret>text</ret>",  # no sub-question
        "<think>t</think><sub-question>q</sub-question>",  # no ret
        "<think>t</think><sub-question>q</sub-question><ret>text",  # unclosed
        "<think>t<sub-question>q</sub-question><ret>text</ret>",  # unclosed think
    ],
)
def test_parse_retrieval_step_failures(text):
    assert R.parse_retrieval_step(text) is None
    assert rscore(text) == 0.0


def test_parse_answer_step():
    assert R.parse_answer_step(ans(" Paris ", " t ")) == ("t", "Paris")
    assert R.parse_answer_step("<answer>Paris</answer>") is None
    assert R.parse_answer_step("<think>t</think> Paris") is None


# ---------------------------------------------------------------------------
# lexical similarity


def test_lexical_similarity():
    sim = R.lexical_similarity
    assert sim("Where does Ann live?", "where does ann live") == 1.0
    assert sim("Where does Ann live?", "population of Velmora") == 0.0
    # counts {where, does, ann, live} vs {where, does, bob, live}: 3 / (2 * 2)
    assert sim("where does ann live", "where does bob live") == pytest.approx(0.75)
    # {a: 2} . {a: 1, b: 1} / (2 * sqrt 2)
    assert sim("a a", "a b") == pytest.approx(2 / (2 * 2**0.5))
    assert sim("Zürich 東京", "zürich") == pytest.approx(1 / 2**0.5)
    assert sim("", "") == 1.0 and sim("?", "?") == 1.0
    assert sim("", "ann") == 0.0 and sim("?", "!") == 0.0


# ---------------------------------------------------------------------------
# retrieval step


def test_retrieval_right_kb_and_query():
    assert rscore(ret("Where does Ann live?", "text")) == 1.0
    assert rscore(ret("where does ann live", "TEXT")) == 1.0  # KB and query case-insensitive


def test_retrieval_right_kb_unrelated_query():
    assert rscore(ret("population of Velmora", "text")) == 0.5


def test_retrieval_wrong_known_kb():
    assert rscore(ret("Where does Ann live?", "table")) == 0.5
    assert rscore(ret("population of Velmora", "table")) == 0.0


def test_retrieval_partial_query():
    # 0.5 * 0.75 + 0.5
    assert rscore(ret("where does bob live", "text"), query="where does ann live") == pytest.approx(0.875)


def test_retrieval_unknown_kb_is_zero():
    assert rscore(ret("Where does Ann live?", "web")) == 0.0
    assert rscore(ret("Where does Ann live?", "")) == 0.0
    # a KB that exists elsewhere is unknown when the row does not list it
    assert rscore(ret("Where does Ann live?", "text"), kbs=["table"]) == 0.0


def test_retrieval_none_kb():
    # the teacher stops: none / none
    assert rscore(ret("None", "None"), query="none", kb="none") == 1.0
    assert rscore(ret("none", "text"), query="none", kb="none") == 0.5
    # none is always allowed, it is just not the teacher's KB here
    assert rscore(ret("Where does Ann live?", "none")) == 0.5


def test_retrieval_kb_lists():
    # MoRE: several known KBs parse, but the KB term needs a single, equal one
    assert rscore(ret("Where does Ann live?", "text, table")) == 0.5
    assert rscore(ret("Where does Ann live?", "text, web")) == 0.0
    assert rscore(ret("Where does Ann live?", "none, text")) == 0.0


def test_retrieval_custom_similarity():
    seen = []

    def sim(a, b):
        seen.append((a, b))
        return 0.2

    assert rscore(ret("Q One", "text"), query="Ref", similarity=sim) == pytest.approx(0.6)
    assert seen == [("q one", "Ref")]  # the completion is lower-cased before parsing, as in MoRE
    f = R.make_retrieval_step_reward(kbs=KBS, similarity=sim, name="ret")
    assert f.__name__ == "ret"
    assert f(None, [ret("x", "table")], ["y"], ["table"]) == [pytest.approx(0.6)]


def test_retrieval_columns():
    comps = [ret("Where does Ann live?", "text"), ret("Where does Ann live?", "table"), ans("x")]
    # one kbs list for all rows, or one per row; a row without references is not a retrieval step
    assert R.retrieval_step_reward(None, comps, ["Where does Ann live?"] * 2 + [None], ["text", "text", None], KBS) == [1.0, 0.5, None]
    per_row = [["text"], ["text", "table"], None]
    assert R.retrieval_step_reward(None, comps, ["Where does Ann live?"] * 2 + [None], ["text", "text", None], per_row) == [1.0, 0.5, None]
    chat = [[{"role": "assistant", "content": ret("Where does Ann live?", "text")}]]
    assert R.retrieval_step_reward(None, chat, ["Where does Ann live?"], ["text"], KBS) == [1.0]


def test_retrieval_missing_fields_raise():
    with pytest.raises(ValueError, match=r"row 0.*'kbs'"):
        R.retrieval_step_reward(None, [ret("q", "text")], ["q"], ["text"])
    with pytest.raises(ValueError, match=r"row 1.*'reference_kb'"):
        R.retrieval_step_reward(None, [ret("q", "text")] * 2, ["q", "q"], ["text", None], KBS)
    with pytest.raises(ValueError, match="3 values for 2 completions"):
        R.retrieval_step_reward(None, [ret("q", "text")] * 2, ["q"] * 3, ["text"] * 3, KBS)
    with pytest.raises(ValueError, match="string"):
        R.retrieval_step_reward(None, [ret("q", "text")], ["q"], ["text"], "text")


# ---------------------------------------------------------------------------
# answer step


def test_normalization():
    n = RR.normalize_recall_text
    assert n("The Eiffel Tower.") == "eiffel tower"
    assert n("an apple, a pear") == "apple a pear"  # MoRE drops 'an' and 'the' only
    assert n("Three (3) U.S. states") == "3 3 us states"
    assert n("1,000 and 3.5") == "1000 and 3.5"
    assert n("new-york/city") == "new york city"
    assert RR.recall_tokens("He said: 'it's 3.5!'") == ["he", "said", "it's", "3.5"]


def test_answer_short_gold_exact():
    assert ascore(ans("Paris"), "Paris") == 1.0
    assert ascore(ans("paris."), "Paris") == 1.0
    assert ascore(ans("It is Paris, in France"), "Paris") == 1.0  # recall, not precision
    assert ascore(ans("eiffel tower"), "The Eiffel Tower") == 1.0
    assert ascore(ans("three"), "3") == 1.0
    assert ascore(ans("1,000 people"), "1000") == 1.0
    assert ascore(ans("1000"), 1000) == 1.0  # a non-string gold is its str()


def test_answer_short_gold_partial_is_zero():
    assert ascore(ans("New York"), "New York City") == 0.0  # recall 2/3
    assert ascore(ans("cat"), "a cat") == 0.0  # 'a' is not an article for MoRE
    assert ascore(ans("red green blue white"), "red green blue white black") == 0.0  # 5 words: needs recall 1


def test_answer_long_gold_partial_recall():
    assert ascore(ans("red green blue white"), "red green blue white black pink") == pytest.approx(4 / 6)
    gold = "Frank Wisbar was born in December 1899."
    assert ascore(ans("born December 1899"), gold) == pytest.approx(3 / 7)
    assert ascore(ans(gold), gold) == 1.0
    assert ascore(ans("no idea"), gold) == 0.0


def test_answer_format_and_empty():
    assert ascore("<answer>Paris</answer>", "Paris") == 0.0  # no think
    assert ascore("<think>Paris</think>", "Paris") == 0.0  # no answer
    assert ascore(ans(""), "Paris") == 0.0
    assert ascore(ans("..."), "Paris") == 0.0


def test_answer_several_golds():
    assert ascore(ans("new york city"), ["NYC", "New York City"]) == 1.0
    # the best gold by F1 is "new york city" (recall 2/3); several golds need recall 1
    assert ascore(ans("new york"), ["NYC", "New York City"]) == 0.0
    assert ascore(ans("nyc"), ["NYC", "New York City"]) == 1.0


def test_answer_columns():
    comps = [ans("Paris"), ans("Rome"), ret("q", "text")]
    assert R.answer_recall_reward(None, comps, ["Paris", "Paris", None]) == [1.0, 0.0, None]
    chat = [[{"role": "assistant", "content": [{"type": "text", "text": ans("Paris")}]}]]
    assert R.answer_recall_reward(None, chat, ["paris"]) == [1.0]


# ---------------------------------------------------------------------------
# dispatch


def _rows():
    return dict(
        step_type=["retrieve", "answer", "retrieve", "answer"],
        reference_query=["Where does Ann live?", None, "none", None],
        reference_kb=["text", None, "none", None],
        answer=[None, "Velmora", None, "Frank Wisbar was born in December 1899"],
        kbs=[KBS, None, KBS, None],
    )


def test_step_type_dispatch():
    comps = [ret("where does ann live", "table"), ans("Velmora"), ret("none", "none"), ans("born in 1899")]
    assert R.step_type_reward(None, comps, **_rows()) == [0.5, 1.0, 1.0, pytest.approx(3 / 7)]
    # a retrieval-format completion on an answer row (and vice versa) scores 0
    swapped = [ans("Velmora"), ret("Velmora", "text"), ans("none"), ret("x", "text")]
    assert R.step_type_reward(None, swapped, **_rows()) == [0.0, 0.0, 0.0, 0.0]
    f = R.make_step_type_reward(kbs=KBS, similarity=lambda a, b: 1.0)
    cols = _rows()
    del cols["kbs"]
    comps[0] = ret("anything", "text")  # similarity fixed at 1, right KB
    assert f(None, comps, **cols) == [1.0, 1.0, 1.0, pytest.approx(3 / 7)]


@pytest.mark.parametrize(
    "row, field",
    [(0, "reference_query"), (0, "reference_kb"), (0, "kbs"), (1, "answer"), (3, "answer")],
)
def test_step_type_missing_field(row, field):
    cols = _rows()
    cols[field] = list(cols[field])
    cols[field][row] = None
    with pytest.raises(ValueError, match=rf"row {row}: \w+ step has no '{field}'"):
        R.step_type_reward(None, [ans("x")] * 4, **cols)


def test_step_type_missing_column_and_unknown_type():
    cols = _rows()
    del cols["answer"]
    with pytest.raises(ValueError, match=r"row 1: answer step has no 'answer'"):
        R.step_type_reward(None, [ans("x")] * 4, **cols)
    cols = _rows()
    cols["step_type"] = ["retrieve", "ans", "retrieve", "answer"]
    with pytest.raises(ValueError, match=r"row 1: unknown step_type 'ans'"):
        R.step_type_reward(None, [ans("x")] * 4, **cols)
    with pytest.raises(ValueError, match="step_type"):
        R.step_type_reward(None, [ans("x")])


def test_reward_set_accepts_step_type_reward():
    rs = R.RewardSet([R.step_type_reward])
    comps = [ret("where does ann live", "text"), ans("Velmora"), ret("none", "none"), ans("nothing")]
    res = rs(None, comps, **_rows())
    assert [float(x) for x in res.total] == [1.0, 1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------
# embedding similarity (a tiny local model; nothing is downloaded)


def test_embedding_similarity_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.embedding_similarity(tmp_path / "no-model")
    with pytest.raises(ValueError, match="pooling"):
        R.embedding_similarity(tmp_path, pooling="max")


@pytest.mark.slow  # imports transformers
def test_embedding_similarity_local_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "where", "does", "ann", "live", "population", "of", "velmora"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    a, b = "where does ann live", "population of velmora"

    def embed(text, pooling):  # one text alone: no padding, so mean pooling is a plain mean
        with torch.no_grad():
            h = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
        return torch.nn.functional.normalize(h[0] if pooling == "cls" else h.mean(0), dim=-1)

    for pooling in ("mean", "cls"):
        sim = R.embedding_similarity(tmp_path, pooling=pooling)
        assert sim(a, a) == pytest.approx(1.0, abs=1e-5)
        # a and b pad to different lengths in one batch: the mask must keep the padding out
        assert sim(a, b) == pytest.approx(float(embed(a, pooling) @ embed(b, pooling)), abs=1e-5)
    s = rscore(ret(a, "text"), query=a, similarity=sim)
    assert s == pytest.approx(1.0, abs=1e-5)
