"""Evaluation metrics: COCO caption metrics, VQAv2 accuracy, image-text retrieval recall.

Captions — :func:`caption_metrics`
    BLEU-1..4, METEOR, ROUGE-L and CIDEr-D computed by ``pycocoevalcap``'s own scorers
    (``Bleu(4)``, ``Meteor``, ``Rouge``, ``Cider``) on text tokenized like the COCO evaluation
    does it: Stanford PTBTokenizer (``stanford-corenlp-3.4.1.jar``, run with ``java``), lower
    case, punctuation tokens removed. The numbers are those of the official pipeline
    (``COCOEvalCap``): fractions in [0, 1], CIDEr on its own scale (0 to about 10).

    Without ``java`` on ``PATH`` the captions are tokenized by a pure-Python re-implementation
    of that PTBTokenizer (:mod:`train._coco_tokenize`), which gives the jar's tokens for ordinary
    English captions, so BLEU, ROUGE-L and CIDEr keep their official values; METEOR is then
    skipped with a warning, because it *is* a Java program (``meteor-1.5.jar``) and has no
    Python equivalent with identical numbers. METEOR runs in a guarded subprocess: when it
    crashes, hangs past ``meteor_timeout`` or cannot start, the ``meteor`` key is left out and a
    :class:`MetricsWarning` says why; the other metrics are still returned.

VQA — :func:`normalize_vqa_answer`, :func:`vqa_accuracy`, :func:`vqa_score`
    The rules of the official VQAv2 evaluation script (``vqaEval.py``): its punctuation
    handling, number words to digits, articles dropped, its contraction table, and the
    accuracy ``min(#humans that gave the answer / 3, 1)`` averaged over the 10 leave-one-out
    subsets of the 10 human answers. That rule is defined for exactly ten answers: a question with
    another number k of reference answers (1, 3, 5, ...) is scored 1 when the prediction matches any
    of them and 0 otherwise (the official formula would cap three identical answers at 2/3), and
    :func:`vqa_score` counts the questions scored each way. One deliberate difference: the official script normalizes
    answers only when the 10 human answers disagree (VQAv2 annotations are already normalized)
    and applies only the punctuation step to them; here prediction and every reference answer
    are always fully normalized, so raw references such as ``"two"`` match a prediction
    ``"2"``. On VQAv2's pre-normalized annotations the results agree.

Retrieval — :func:`retrieval_metrics`
    Recall@K for image-to-text and text-to-image retrieval from an (images x texts) score
    matrix, with several texts per image and, optionally, identical captions counted as
    equivalent.

Only the standard library, numpy and (optionally) torch are imported here; pycocoevalcap is
imported lazily by :func:`caption_metrics`.
"""

from __future__ import annotations

import atexit
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from train import _coco_tokenize

__all__ = [
    "CAPTION_METRICS",
    "OFFICIAL_ANSWERS",
    "MetricsWarning",
    "caption_metrics",
    "close_meteor",
    "normalize_vqa_answer",
    "retrieval_metrics",
    "vqa_accuracy",
    "vqa_score",
]


class MetricsWarning(UserWarning):
    """A metric was skipped or computed in a degraded way (e.g. no java: no METEOR)."""


# =============================================================================================
# Captions
# =============================================================================================

CAPTION_METRICS = ("bleu", "meteor", "rouge", "cider")
_METRIC_ALIASES = {"bleu": "bleu", "meteor": "meteor", "rouge": "rouge", "rouge_l": "rouge",
                   "cider": "cider", "cider_d": "cider"}
_METRIC_KEYS = {"bleu": ("bleu_1", "bleu_2", "bleu_3", "bleu_4"), "meteor": ("meteor",),
                "rouge": ("rouge_l",), "cider": ("cider",)}


def _warn(msg: str, level: int = 3) -> None:
    warnings.warn(msg, MetricsWarning, stacklevel=level)


class MeteorError(RuntimeError):
    """The METEOR subprocess failed, hung or gave output we could not read."""


def _meteor_command() -> tuple[list[str], str]:
    """The command pycocoevalcap's ``Meteor`` runs, and the folder it runs it in."""
    from pycocoevalcap.meteor import meteor

    folder = os.path.dirname(os.path.abspath(meteor.__file__))
    jar = getattr(meteor, "METEOR_JAR", "meteor-1.5.jar")
    java = shutil.which("java") or "java"
    return [java, "-jar", "-Xmx2G", jar, "-", "-", "-stdio", "-l", "en", "-norm"], folder


class _Meteor:
    """pycocoevalcap's METEOR protocol (``SCORE`` lines, then one ``EVAL`` line) with guards.

    pycocoevalcap's ``Meteor`` blocks forever when the jar stops answering (e.g. stuck on a full
    stderr pipe or out of memory), turns a crash into an unhelpful ``ValueError``, and can
    deadlock in ``__del__`` after an error. Here stdout is read by a thread with a deadline,
    stderr goes to a file, and the process is always killed at the end. The strings sent are
    the ones pycocoevalcap sends, so the score is the same.
    """

    def __init__(self) -> None:
        cmd, cwd = _meteor_command()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self._proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._stderr)
        except OSError as e:
            self._stderr.close()
            raise MeteorError(f"cannot start METEOR ({e})") from e
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self._proc.stdout:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        self._lines.put(None)

    def _write(self, data: bytes, deadline: float) -> None:
        def write():
            try:
                self._proc.stdin.write(data)
                self._proc.stdin.flush()
            except (OSError, ValueError) as e:
                errors.append(e)

        errors: list[Exception] = []
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(max(0.0, deadline - time.monotonic()))
        if writer.is_alive():
            raise MeteorError("METEOR stopped reading its input (timed out)")
        if errors:
            raise MeteorError(f"METEOR closed its input ({errors[0]}){self._stderr_tail()}")

    def _readline(self, deadline: float) -> str:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise MeteorError("METEOR timed out") from None
        if line is None:
            code = self._proc.poll()
            raise MeteorError(f"METEOR exited (code {code}){self._stderr_tail()}")
        return line.decode("utf-8", "replace").strip()

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            tail = self._stderr.read()[-1500:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return f": {tail}" if tail else ""

    def score(self, refs: Sequence[Sequence[str]], hyps: Sequence[str], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        score_lines = []
        for ref, hyp in zip(refs, hyps):
            hyp = hyp.replace("|||", "").replace("  ", " ")
            # pycocoevalcap does not clean references; a "|||" in one would break the protocol.
            ref = [r.replace("|||", "") for r in ref]
            score_lines.append(" ||| ".join(("SCORE", " ||| ".join(ref), hyp)) + "\n")
        self._write("".join(score_lines).encode("utf-8"), deadline)
        stats = [self._readline(deadline) for _ in hyps]
        self._write(("EVAL" + "".join(f" ||| {s}" for s in stats) + "\n").encode("utf-8"), deadline)
        for _ in hyps:  # per-caption scores, not reported
            self._readline(deadline)
        line = self._readline(deadline)
        try:
            return float(line)
        except ValueError:
            raise MeteorError(f"unexpected METEOR output {line[:200]!r}") from None

    def close(self) -> None:
        proc = self._proc
        try:
            if proc.stdin:
                proc.stdin.close()
        except OSError:
            pass
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if proc.stdout:
            proc.stdout.close()
        self._stderr.close()

    def alive(self) -> bool:
        return self._proc.poll() is None


# One METEOR process kept between calls with keep_meteor=True (its start-up, which loads a
# paraphrase table, takes 5-20 s; the process then holds about 1-2 GB of memory).
_kept_meteor: _Meteor | None = None
_kept_lock = threading.Lock()


def close_meteor() -> None:
    """Stop the METEOR process kept by ``caption_metrics(..., keep_meteor=True)``, if any."""
    global _kept_meteor
    with _kept_lock:
        if _kept_meteor is not None:
            _kept_meteor.close()
            _kept_meteor = None


atexit.register(close_meteor)


def _as_prediction(key: Hashable, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    raise TypeError(f"prediction for {key!r} must be a string, got {type(value).__name__}")


def _as_references(key: Hashable, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(r, str) for r in value):
        raise TypeError(f"references for {key!r} must be a list of strings")
    if not value:
        raise ValueError(f"no reference captions for {key!r}")
    return list(value)


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = CAPTION_METRICS,
    *,
    tokenizer: str = "auto",
    meteor_timeout: float | None = None,
    keep_meteor: bool = False,
) -> dict[str, float]:
    """COCO caption metrics of ``predictions`` against ``references``.

    Args:
        predictions: key -> generated caption (one string; a one-element list is accepted;
            ``None`` counts as an empty caption). Every key is scored.
        references: key -> reference captions (at least one each). Keys without a prediction
            are ignored; a prediction without references is an error.
        metrics: any of ``"bleu"``, ``"meteor"``, ``"rouge"``, ``"cider"``.
        tokenizer: ``"auto"`` (the PTBTokenizer jar when ``java`` is on ``PATH``, else the
            pure-Python copy), ``"java"`` (jar only; error without java) or ``"python"``.
        meteor_timeout: seconds METEOR may take before it is abandoned (default
            ``120 + 0.05 * len(predictions)``, start-up included).
        keep_meteor: keep the METEOR java process alive for the next call (saves its 5-20 s
            start-up when evaluating repeatedly, e.g. during training, at the cost of 1-2 GB
            of memory held until :func:`close_meteor` or interpreter exit).

    Returns:
        ``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``, ``cider`` (those requested) as floats,
        the values pycocoevalcap's ``COCOEvalCap`` reports. ``meteor`` is missing, with a
        :class:`MetricsWarning`, when java is unavailable or METEOR fails. No predictions at all
        gives 0.0 for every requested metric (with a warning).
    """
    wanted = []
    for name in metrics:
        canonical = _METRIC_ALIASES.get(str(name).lower())
        if canonical is None:
            raise ValueError(f"unknown caption metric {name!r}; choose from {CAPTION_METRICS}")
        if canonical not in wanted:
            wanted.append(canonical)
    if tokenizer not in ("auto", "java", "python"):
        raise ValueError(f"tokenizer must be 'auto', 'java' or 'python', got {tokenizer!r}")

    keys = list(predictions)
    missing = [k for k in keys if k not in references]
    if missing:
        raise KeyError(f"{len(missing)} prediction(s) have no references, e.g. {missing[:3]!r}")
    hyps = [_as_prediction(k, predictions[k]) for k in keys]
    refs = [_as_references(k, references[k]) for k in keys]
    if not keys:
        _warn("caption_metrics: no predictions; every metric is 0.0")
        return {key: 0.0 for name in wanted for key in _METRIC_KEYS[name]}

    have_java = _coco_tokenize.java_available()
    if tokenizer == "java" and not have_java:
        raise RuntimeError("tokenizer='java' but java is not on PATH")

    if "meteor" in wanted and not have_java:
        _warn("caption_metrics: java is not on PATH, so METEOR (a Java program) is skipped; "
              "BLEU/ROUGE-L/CIDEr use the pure-Python PTB tokenizer")
    if "meteor" in wanted and have_java and keep_meteor:
        with _kept_lock:
            return _caption_metrics(keys, hyps, refs, wanted, tokenizer, have_java,
                                    meteor_timeout, keep=True)
    return _caption_metrics(keys, hyps, refs, wanted, tokenizer, have_java, meteor_timeout,
                            keep=False)


def _caption_metrics(keys, hyps, refs, wanted, tokenizer, have_java, meteor_timeout, keep):
    global _kept_meteor
    meteor = None
    if "meteor" in wanted and have_java:
        if keep and _kept_meteor is not None and _kept_meteor.alive():
            meteor = _kept_meteor
        else:
            if keep and _kept_meteor is not None:
                _kept_meteor.close()
                _kept_meteor = None
            try:  # start now: the JVM loads its paraphrase table while we tokenize
                meteor = _Meteor()
            except MeteorError as e:
                _warn(f"caption_metrics: METEOR skipped: {e}", 4)
            if keep:
                _kept_meteor = meteor

    meteor_failed = False
    try:
        flat_refs = [r for rs in refs for r in rs]
        use_java = have_java and tokenizer != "python"
        tok_refs = tok_hyps = None
        if use_java:
            try:
                tok_refs, tok_hyps = _coco_tokenize.ptb_tokenize_java([flat_refs, hyps])
            except RuntimeError as e:
                if tokenizer == "java":
                    raise
                _warn(f"caption_metrics: PTBTokenizer (java) failed, using the pure-Python "
                      f"tokenizer instead: {e}", 4)
        if tok_refs is None:
            tok_refs, tok_hyps = _coco_tokenize.ptb_tokenize_python([flat_refs, hyps])
        gts: dict[int, list[str]] = {}
        start = 0
        for i, rs in enumerate(refs):
            gts[i] = tok_refs[start:start + len(rs)]
            start += len(rs)
        res = {i: [h] for i, h in enumerate(tok_hyps)}

        out: dict[str, float] = {}
        if "bleu" in wanted:
            from pycocoevalcap.bleu.bleu import Bleu

            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            out.update({f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
        if "meteor" in wanted and meteor is not None:
            timeout = meteor_timeout if meteor_timeout is not None else 120.0 + 0.05 * len(keys)
            try:
                out["meteor"] = meteor.score([gts[i] for i in res], [res[i][0] for i in res], timeout)
            except MeteorError as e:
                meteor_failed = True
                _warn(f"caption_metrics: METEOR skipped: {e}", 4)
        if "rouge" in wanted:
            from pycocoevalcap.rouge.rouge import Rouge

            out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        if "cider" in wanted:
            from pycocoevalcap.cider.cider import Cider

            if any(r for rs in gts.values() for r in rs):
                out["cider"] = float(Cider().compute_score(gts, res)[0])
            else:  # pycocoevalcap's Cider fails on references without a single word
                out["cider"] = 0.0
    except BaseException:
        meteor_failed = True
        raise
    finally:
        if meteor is not None and (not keep or meteor_failed):
            meteor.close()
            if keep:
                _kept_meteor = None
    return {key: out[key] for name in wanted for key in _METRIC_KEYS[name] if key in out}


# =============================================================================================
# VQA
# =============================================================================================

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


# =============================================================================================
# Retrieval
# =============================================================================================

def _to_numpy(sim: Any) -> np.ndarray:
    if hasattr(sim, "detach"):  # torch.Tensor, without importing torch
        sim = sim.detach()
        if sim.dtype.is_floating_point and sim.dtype.itemsize < 4:
            sim = sim.float()  # bfloat16 has no numpy equivalent
        sim = sim.cpu().numpy()
    arr = np.asarray(sim, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"similarity must be 2-D (num_images, num_texts), got shape {arr.shape}")
    # NaN scores rank last (as -inf); ties are broken by index below
    return np.where(np.isnan(arr), -np.inf, arr)


def _first_hit_ranks(scores: np.ndarray, relevant: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each row, the 0-based rank of its best relevant column under a stable descending
    sort (higher score first, equal scores by column index); -1 for rows with none."""
    rows, cols = scores.shape
    ranks = np.full(rows, -1, dtype=np.int64)
    idx = np.arange(cols)
    for lo in range(0, rows, chunk):
        s = scores[lo:lo + chunk]
        r = relevant[lo:lo + chunk]
        has = r.any(axis=1)
        # best relevant column: highest score, lowest index among equal scores
        masked = np.where(r, s, -np.inf)
        best_score = masked.max(axis=1, keepdims=True)
        best_col = np.argmax(r & (masked == best_score), axis=1)
        higher = (s > best_score).sum(axis=1)
        tied_before = ((s == best_score) & (idx[None, :] < best_col[:, None])).sum(axis=1)
        ranks[lo:lo + chunk] = np.where(has, higher + tied_before, -1)
    return ranks


def retrieval_metrics(
    sim: Any,
    text_to_image: Sequence[int] | None = None,
    image_to_texts: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    text_keys: Sequence[str] | None = None,
) -> dict[str, float]:
    """Recall@K for image->text and text->image retrieval.

    Args:
        sim: ``(num_images, num_texts)`` scores (torch tensor or array-like); higher = closer.
        text_to_image: image index of each text (``len == num_texts``).
        image_to_texts: text indices of each image (``len == num_images``). Either one, or both
            (their pairs are merged), describe the ground truth; with neither, ``sim`` must be
            square and text ``i`` belongs to image ``i``.
        ks: the K of Recall@K.
        text_keys: optional string per text (usually the caption). Texts with equal keys are
            interchangeable: for image->text a retrieved text is a hit when its key equals the
            key of one of the image's own texts, and for text->image an image is a hit when one
            of its texts has the query's key. Use it when captions repeat across images.

    Returns:
        ``retrieval_i2t_r{k}`` (fraction of images with a relevant text among their top k) and
        ``retrieval_t2i_r{k}`` (fraction of texts with a relevant image among their top k).
        Rankings are deterministic: a stable sort by descending score, so equal scores rank
        by index, and NaN scores rank last. Images without any text (and texts without an
        image) are left out of the averages.
    """
    scores = _to_numpy(sim)
    n_img, n_txt = scores.shape
    relevant = np.zeros((n_img, n_txt), dtype=bool)
    if text_to_image is None and image_to_texts is None:
        if n_img != n_txt:
            raise ValueError(f"similarity is {n_img}x{n_txt}: pass text_to_image or image_to_texts "
                             "when it is not square")
        np.fill_diagonal(relevant, True)
    if text_to_image is not None:
        t2i = np.asarray(text_to_image, dtype=np.int64).reshape(-1)
        if t2i.shape[0] != n_txt:
            raise ValueError(f"text_to_image has {t2i.shape[0]} entries for {n_txt} texts")
        if t2i.size and (t2i.min() < 0 or t2i.max() >= n_img):
            raise ValueError(f"text_to_image has an image index outside [0, {n_img})")
        relevant[t2i, np.arange(n_txt)] = True
    if image_to_texts is not None:
        if len(image_to_texts) != n_img:
            raise ValueError(f"image_to_texts has {len(image_to_texts)} entries for {n_img} images")
        for i, texts in enumerate(image_to_texts):
            for j in texts:
                if not 0 <= int(j) < n_txt:
                    raise ValueError(f"image_to_texts[{i}] has a text index outside [0, {n_txt})")
                relevant[i, int(j)] = True
    if text_keys is not None:
        if len(text_keys) != n_txt:
            raise ValueError(f"text_keys has {len(text_keys)} entries for {n_txt} texts")
        _, key_ids = np.unique(np.asarray([str(k) for k in text_keys], dtype=object), return_inverse=True)
        key_ids = key_ids.reshape(-1)
        # image i is relevant to text j when one of i's texts has j's key
        has_key = np.zeros((n_img, int(key_ids.max()) + 1 if n_txt else 0), dtype=bool)
        rows, cols = np.nonzero(relevant)
        has_key[rows, key_ids[cols]] = True
        relevant = has_key[:, key_ids]

    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {ks}")
    i2t = _first_hit_ranks(scores, relevant)
    t2i = _first_hit_ranks(scores.T, relevant.T)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        ranks = ranks[ranks >= 0]
        for k in ks:
            out[f"retrieval_{name}_r{k}"] = float((ranks < k).mean()) if ranks.size else 0.0
    return out
