"""COCO caption metrics: :func:`caption_metrics`.

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D computed by ``pycocoevalcap``'s own scorers (``Bleu(4)``,
``Meteor``, ``Rouge``, ``Cider``) on text tokenized like the COCO evaluation does it: Stanford
PTBTokenizer (``stanford-corenlp-3.4.1.jar``, run with ``java``), lower case, punctuation tokens
removed. The numbers are those of the official pipeline (``COCOEvalCap``): fractions in [0, 1],
CIDEr on its own scale (0 to about 10).

Without ``java`` on ``PATH`` the captions are tokenized by a pure-Python re-implementation of that
PTBTokenizer (:mod:`train.metrics._coco_tokenize`), which gives the jar's tokens for ordinary
English captions, so BLEU, ROUGE-L and CIDEr keep their official values; METEOR is then skipped
with a warning, because it *is* a Java program (``meteor-1.5.jar``) and has no Python equivalent
with identical numbers. METEOR runs in a guarded subprocess (:mod:`train.metrics.meteor`): when it
crashes, hangs past ``meteor_timeout`` or cannot start, the ``meteor`` key is left out and a
:class:`MetricsWarning` says why; the other metrics are still returned.

Only the standard library is imported here; pycocoevalcap's scorers are imported when used.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from train.metrics import _coco_tokenize
from train.metrics.meteor import MeteorError, kept_lock, open_meteor, release_meteor

__all__ = ["CAPTION_METRICS", "MetricsWarning", "caption_metrics"]


class MetricsWarning(UserWarning):
    """A metric was skipped or computed in a degraded way (e.g. no java: no METEOR)."""


CAPTION_METRICS = ("bleu", "meteor", "rouge", "cider")
_METRIC_ALIASES = {"bleu": "bleu", "meteor": "meteor", "rouge": "rouge", "rouge_l": "rouge",
                   "cider": "cider", "cider_d": "cider"}
_METRIC_KEYS = {"bleu": ("bleu_1", "bleu_2", "bleu_3", "bleu_4"), "meteor": ("meteor",),
                "rouge": ("rouge_l",), "cider": ("cider",)}


def _warn(msg: str, level: int = 3) -> None:
    warnings.warn(msg, MetricsWarning, stacklevel=level)


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
        with kept_lock:
            return _caption_metrics(keys, hyps, refs, wanted, tokenizer, have_java,
                                    meteor_timeout, keep=True)
    return _caption_metrics(keys, hyps, refs, wanted, tokenizer, have_java, meteor_timeout,
                            keep=False)



def _caption_metrics(keys, hyps, refs, wanted, tokenizer, have_java, meteor_timeout, keep):
    meteor = None
    if "meteor" in wanted and have_java:
        try:  # start now: the JVM loads its paraphrase table while we tokenize
            meteor = open_meteor(keep)
        except MeteorError as e:
            _warn(f"caption_metrics: METEOR skipped: {e}", 4)

    meteor_failed = False
    try:
        gts, res = _tokenized(refs, hyps, tokenizer, have_java)
        out: dict[str, float] = {}
        if "bleu" in wanted:
            out.update(_bleu(gts, res))
        if "meteor" in wanted and meteor is not None:
            timeout = meteor_timeout if meteor_timeout is not None else 120.0 + 0.05 * len(keys)
            try:
                out["meteor"] = meteor.score([gts[i] for i in res], [res[i][0] for i in res], timeout)
            except MeteorError as e:
                meteor_failed = True
                _warn(f"caption_metrics: METEOR skipped: {e}", 4)
        if "rouge" in wanted:
            out["rouge_l"] = _rouge_l(gts, res)
        if "cider" in wanted:
            out["cider"] = _cider(gts, res)
    except BaseException:
        meteor_failed = True
        raise
    finally:
        release_meteor(meteor, keep, meteor_failed)
    return {key: out[key] for name in wanted for key in _METRIC_KEYS[name] if key in out}


def _tokenized(refs: list[list[str]], hyps: list[str], tokenizer: str, have_java: bool):
    """References and predictions tokenized as the COCO evaluation does, in pycocoevalcap's
    input form: ``gts`` {i: [reference, ...]} and ``res`` {i: [prediction]}."""
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
                  f"tokenizer instead: {e}", 5)
    if tok_refs is None:
        tok_refs, tok_hyps = _coco_tokenize.ptb_tokenize_python([flat_refs, hyps])
    gts: dict[int, list[str]] = {}
    start = 0
    for i, rs in enumerate(refs):
        gts[i] = tok_refs[start:start + len(rs)]
        start += len(rs)
    res = {i: [h] for i, h in enumerate(tok_hyps)}
    return gts, res


def _bleu(gts: dict[int, list[str]], res: dict[int, list[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}


def _rouge_l(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    from pycocoevalcap.rouge.rouge import Rouge

    return float(Rouge().compute_score(gts, res)[0])


def _cider(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    from pycocoevalcap.cider.cider import Cider

    if any(r for rs in gts.values() for r in rs):
        return float(Cider().compute_score(gts, res)[0])
    return 0.0  # pycocoevalcap's Cider fails on references without a single word
