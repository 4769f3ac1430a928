"""VQAv2 accuracy: :func:`normalize_vqa_answer`, :func:`vqa_accuracy`, :func:`vqa_score`.

The rules of the official VQAv2 evaluation script (``vqaEval.py``): its punctuation handling,
number words to digits, articles dropped, its contraction table, and the accuracy
``min(#humans that gave the answer / 3, 1)`` averaged over the 10 leave-one-out subsets of the 10
human answers. That rule is defined for exactly ten answers: a question with another number k of
reference answers (1, 3, 5, ...) is scored 1 when the prediction matches any of them and 0
otherwise (the official formula would cap three identical answers at 2/3), and
:func:`vqa_score` counts the questions scored each way. One deliberate difference: the official
script normalizes answers only when the 10 human answers disagree (VQAv2 annotations are already
normalized) and applies only the punctuation step to them; here prediction and every reference
answer are always fully normalized, so raw references such as ``"two"`` match a prediction
``"2"``. On VQAv2's pre-normalized annotations the results agree.

Only the standard library and numpy are imported here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["OFFICIAL_ANSWERS", "normalize_vqa_answer", "vqa_accuracy", "vqa_score"]

# vqaEval.py's contraction table (keys are matched after lower-casing, so the few keys with
# capitals, kept here as in the official table, never match).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
              ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# vqaEval.py writes "(?!<=\d)(\.)(?!\d)": a typo for a look-behind that asserts nothing, so
# every period not followed by a digit goes. It also passes re.UNICODE (= 32) as the *count*
# argument of sub(), so at most 32 periods are removed; both quirks are kept.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = 32


def _vqa_punctuation(text: str) -> str:
    """vqaEval.processPunctuation."""
    out = text
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _VQA_PUNCT:
        # a mark next to a space, or any mark when the text has a digit,digit, is deleted;
        # otherwise it becomes a space ("black/white" -> "black white", "3,000" -> "3000")
        if strip_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _vqa_digits_articles(text: str) -> str:
    """vqaEval.processDigitArticle: lower case, number words -> digits, no articles,
    contractions restored."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalize an answer by the official VQAv2 rules (``vqaEval.py``).

    Newlines and tabs become spaces, surrounding space is stripped, then punctuation is
    handled (``"yes!"`` -> ``"yes"``, ``"3,000"`` -> ``"3000"``, periods not followed by a digit
    removed, ``"3.5"`` kept), the text is lower-cased, number words up to ten become digits
    (``"Two"`` -> ``"2"``, ``"none"`` -> ``"0"``), the articles a/an/the are dropped, missing
    apostrophes are restored (``"dont"`` -> ``"don't"``) and whitespace is collapsed.
    """
    text = str(answer).replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


OFFICIAL_ANSWERS = 10  # the official VQAv2 rule is defined for this many human answers


def _accuracy_normalized(pred: str, answers: Sequence[str]) -> float:
    n = len(answers)
    if n == 0:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if n != OFFICIAL_ANSWERS:  # the rule below is defined for ten annotators: k others count any match
        return float(pred in answers)
    matches = sum(a == pred for a in answers)
    # leave each human answer out in turn; credit min(matches among the others / 3, 1)
    total = sum(min(1.0, (matches - (a == pred)) / 3.0) for a in answers)
    return total / n


def _answer_text(answer: Any) -> str:
    # VQAv2 annotations list answers as {"answer": ..., "answer_confidence": ..., ...}
    return answer["answer"] if isinstance(answer, Mapping) else answer


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the reference ``answers``.

    After :func:`normalize_vqa_answer` on both sides. With exactly 10 answers (VQAv2's ten annotators):
    the official rule, the mean over the leave-one-out subsets (each answer left out once) of
    ``min(#answers in the subset equal to the prediction / 3, 1)``: 0 matches -> 0, 1 -> 0.3, 2 -> 0.6,
    3 -> 0.9, 4 or more -> 1.0. With any other count k (1, 3, 5, ...) the official rule is not defined
    (it would cap a prediction that matches all of 3 answers at 2/3): the score is 1.0 when the
    prediction matches any of them, else 0.0. Answers may also be VQAv2 annotation dicts
    (``{"answer": ...}``).
    """
    if isinstance(answers, (str, Mapping)):
        answers = [answers]
    return _accuracy_normalized(normalize_vqa_answer(prediction),
                                [normalize_vqa_answer(_answer_text(a)) for a in answers])


def vqa_score(
    predictions: Sequence[str],
    answers_list: Sequence[Sequence[str]],
    question_types: Sequence[str] | None = None,
) -> dict[str, float]:
    """Mean VQA accuracy (a fraction, not a percentage).

    Returns ``{"vqa_accuracy": overall}`` plus ``"vqa_accuracy/<type>"`` for each distinct
    entry of ``question_types`` (e.g. "color", "count") when given. No predictions -> 0.0.
    """
    if len(predictions) != len(answers_list):
        raise ValueError(f"{len(predictions)} predictions but {len(answers_list)} answer lists")
    if question_types is not None and len(question_types) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(question_types)} question types")
    scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers_list)]
    out = {"vqa_accuracy": float(np.mean(scores)) if scores else 0.0}
    if question_types is not None:
        by_type: dict[str, list[float]] = {}
        for t, s in zip(question_types, scores):
            by_type.setdefault(str(t), []).append(s)
        for t in sorted(by_type):
            out[f"vqa_accuracy/{t}"] = float(np.mean(by_type[t]))
    return out
