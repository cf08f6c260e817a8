import pytest
import sacrebleu
from rouge_score import rouge_scorer

from jpeft.errors import JpeftError
from jpeft.evaluate import accuracy, text_metrics

PREDS = ["the cat sat on the mat. It was happy.", "a dog ran to the park"]
REFS = [["a cat sat on a mat. it is happy", "the cats were sitting on the mat"],
        ["the dog ran to the park"]]


def test_rouge_uses_the_best_reference():
    # row 1: the first reference wins rouge1, the second wins rouge2, so "first" or "mean" would fail
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = text_metrics(PREDS, REFS)
    assert got["n"] == 2
    for name in ("rouge1", "rouge2", "rougeL"):
        per_row = [max(scorer.score(r, p)[name].fmeasure for r in refs)
                   for p, refs in zip(PREDS, REFS)]
        assert got[name] == pytest.approx(sum(per_row) / 2)
    # rougeLsum splits sentences: row 1 is scored as two lines
    lsum = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    row1 = max(lsum.score(r, "the cat sat on the mat.\nIt was happy.")["rougeLsum"].fmeasure
               for r in REFS[0])
    row2 = lsum.score(REFS[1][0], PREDS[1])["rougeLsum"].fmeasure
    assert got["rougeLsum"] == pytest.approx((row1 + row2) / 2)
    assert all(0 <= got[k] <= 1 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))


def test_bleu_with_different_reference_counts():
    got = text_metrics(PREDS, REFS)
    # sacrebleu's own way to give rows different numbers of references: None in a stream
    expected = sacrebleu.corpus_bleu(PREDS, [[REFS[0][0], REFS[1][0]], [REFS[0][1], None]])
    assert got["bleu"] == pytest.approx(expected.score)
    single = text_metrics(PREDS, [r[0] for r in REFS])  # bare strings are single references
    assert single["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [[r[0] for r in REFS]]).score)
    assert text_metrics(["the dog ran to the park"], [["the dog ran to the park"]])["bleu"] == \
        pytest.approx(100.0)


def test_accuracy_exact_match_after_strip_any_reference():
    assert accuracy([" yes\n", "no", "maybe"], [["no", "yes"], "No", ["maybe "]]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("preds, refs", [(["a"], []), ([], []), (["a"], [[]]), ([1], ["a"])])
def test_bad_inputs_raise(preds, refs):
    with pytest.raises(JpeftError):
        text_metrics(preds, refs)
    with pytest.raises(JpeftError):
        accuracy(preds, refs)
