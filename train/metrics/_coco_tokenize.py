"""Caption tokenization the way the COCO caption evaluation does it.

The COCO evaluation (``pycocoevalcap``) lower-cases and tokenizes every caption with the
Stanford PTBTokenizer from ``stanford-corenlp-3.4.1.jar`` (a Java program) and then drops the
tokens in :data:`PUNCTUATIONS`. Two implementations live here:

* :func:`ptb_tokenize_java` runs that same jar, with the same command line, once for a whole
  batch of texts. Unlike ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`` it writes its
  temporary file to the system temporary directory (not into ``site-packages``, which may be
  read-only), has a timeout, keeps the output aligned when a caption contains a line break, and
  checks the alignment instead of silently mis-assigning captions.
* :func:`ptb_tokenize_python` is a pure-Python re-implementation of the lexer rules of that
  PTBTokenizer version (a JFlex scanner, emulated rule by rule with its longest-match
  semantics), used when ``java`` is not installed. It reproduces the jar's output for ordinary
  English captions: words, numbers, contractions and possessives (``don't`` -> ``do n't``,
  ``dog's`` -> ``dog 's``, ``cannot`` -> ``can not``), hyphenated words, abbreviations and
  acronyms that keep their period (``mr.``, ``u.s.``, ``etc.``), quotes, brackets (which the
  jar writes as ``-lrb-`` etc. and which are *not* removed), ellipses and dashes. Checked
  against the jar on about 30,000 generated lines (caption-like text, and random strings of
  letters, digits and ASCII/typographic punctuation) with no difference. Not promised token
  for token: URLs, e-mail addresses, SGML/HTML tags, emoticons, phone numbers, and Unicode
  symbols or scripts beyond Latin letters.

Only the standard library is used.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

__all__ = [
    "PUNCTUATIONS",
    "java_available",
    "ptb_tokenize_java",
    "ptb_tokenize_python",
    "ptb_tokens_python",
]

# Tokens that pycocoevalcap's PTBTokenizer removes after tokenization (same list, same order).
# Because the jar is run with -lowerCase, "-LRB-" etc. come out as "-lrb-" and are NOT removed;
# that is how the official evaluation behaves, and both implementations here reproduce it.
PUNCTUATIONS = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"]
_PUNCT_SET = frozenset(PUNCTUATIONS)

_JAR_NAME = "stanford-corenlp-3.4.1.jar"
# Characters the Java lexer treats as line ends. pycocoevalcap only replaces "\n"; any other
# line end inside a caption would shift every later caption by one line, so we replace them all.
_LINE_BREAKS = re.compile("\r\n|[\n\r\u2028\u2029\x0b\x0c\x85]")


def java_available() -> bool:
    """True when a ``java`` executable is on ``PATH``."""
    return shutil.which("java") is not None


def _tokenizer_jar() -> str:
    from pycocoevalcap.tokenizer import ptbtokenizer  # lazy: only the jar's location is needed

    return os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                        getattr(ptbtokenizer, "STANFORD_CORENLP_3_4_1_JAR", _JAR_NAME))


def _strip_punct(line: str) -> str:
    # Exactly pycocoevalcap's post-processing: split on single spaces, drop punctuation tokens.
    return " ".join(w for w in line.rstrip().split(" ") if w not in _PUNCT_SET)


def _clean(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text)


_SENTINEL = "zzptbsentinelzz"


def ptb_tokenize_java(streams: Sequence[Sequence[str]], timeout: float | None = None) -> list[list[str]]:
    """Tokenize texts with the COCO PTBTokenizer jar, in a single java run.

    ``streams`` is a list of text lists; each is tokenized as if it were given to the jar on its
    own, like pycocoevalcap tokenizes the references and the candidates in two runs (the lexer
    looks one line ahead in rare cases, so neighbours matter). Returns, per stream, one string
    per text: lower-cased tokens joined by spaces, :data:`PUNCTUATIONS` removed — exactly what
    pycocoevalcap produces. Raises ``RuntimeError`` when java is missing, fails, times out or
    its output does not line up with the input.
    """
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("java is not on PATH")
    lines: list[str] = []
    for stream in streams:
        # A sentinel line after each stream keeps the streams apart (it cannot change how the
        # line before it is tokenized) and lets us check that output line i is input line i.
        lines.extend(_clean(t) for t in stream)
        lines.append(_SENTINEL)
    jar = _tokenizer_jar()
    payload = "\n".join(lines).encode("utf-8")
    fd, path = tempfile.mkstemp(prefix="ptb_", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        if timeout is None:
            timeout = 120.0 + len(payload) / 20000.0
        cmd = [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", path]
        try:
            proc = subprocess.run(cmd, cwd=os.path.dirname(jar), capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"PTBTokenizer timed out after {timeout:.0f} s") from e
    finally:
        os.remove(path)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise RuntimeError(f"PTBTokenizer failed with exit code {proc.returncode}: {err}")
    out_lines = proc.stdout.decode("utf-8", "replace").split("\n")
    result: list[list[str]] = []
    k = 0
    for stream in streams:
        chunk = out_lines[k:k + len(stream) + 1]
        if len(chunk) != len(stream) + 1 or chunk[-1].strip() != _SENTINEL:
            raise RuntimeError("PTBTokenizer output does not line up with its input "
                               f"({len(lines)} lines in, {len(out_lines)} out)")
        result.append([_strip_punct(line) for line in chunk[:-1]])
        k += len(stream) + 1
    return result


# ---------------------------------------------------------------------------------------------
# Pure-Python emulation of the PTBLexer of Stanford CoreNLP 3.4.1 (a JFlex scanner).
#
# JFlex semantics: at each position every rule is tried, the longest match wins (for a rule
# "r/s" with trailing context the length of "r s" counts, but only "r" is consumed), and ties go
# to the rule listed first. The scanner is case-insensitive for literal strings but NOT inside
# character classes, so literals below are wrapped in (?i:...) while classes stay as written.
# ---------------------------------------------------------------------------------------------

# Python's [^\W\d_] also accepts numeric symbols such as "½" or "²", which Java's isLetter does not.
_NOT_NUMERIC = "(?![\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u209F\u2150-\u218F\u2460-\u24FF\u2776-\u2793])"
_L = rf"(?:{_NOT_NUMERIC}[^\W\d_]|[\u00AD\u0237-\u024F\u0300-\u036F])"  # [:letter:] + extras
_D = r"\d"  # [:digit:]
_LD = rf"(?:{_NOT_NUMERIC}[^\W_]|[\u00AD\u0237-\u024F\u0300-\u036F])"  # letter or digit
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_SPACENL = r"[ \t\u00A0\u2000-\u200A\u3000\n]"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = r"(?:['\u0092\u2019]|&apos;|[`\u0091\u2018\u201B])"
_HYPHEN = r"[-_\u058A\u2010\u2011]"

_WORD = rf"{_L}(?:{_L}|{_D})*(?:[.!?]{_L}(?:{_L}|{_D})*)*"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
# (alternatives ordered so that Python's first match is JFlex's longest match)
_NUM = rf"{_D}*(?:[.:,\u00AD\u066B\u066C]{_D}+)+|{_D}+"
_NUMBER = rf"[-+]?(?:{_NUM})"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])*|(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))"
_ACRO2 = r"[A-Za-z](?:\.[A-Za-z])+|(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))"
_ABMONTH = r"jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"
_ABDAYS = r"mon|tue|tues|wed|thu|thurs|fri"
_ABSTATE = (r"(?i:ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|"
            r"nev|okla|penn|tenn|va|vt|wisc?|wyo)|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass)|"
            r"M(?i:iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash)")
_ABCOMP = r"inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys"
_ABNUM = r"tel|est|ext|sq"
_ABPTIT = r"jr|bros|(?:ed|ph)\.d|esq"
_ABBREV1 = (rf"(?:(?i:{_ABMONTH}|{_ABDAYS}|{_ABCOMP}|{_ABNUM}|{_ABPTIT}|etc|al|seq|bldg)|"
            rf"{_ABSTATE})\.")
_ABTITLE = (r"(?i:mr|mrs|ms|mx|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|"
            r"sgt|cpl|pvt|capt|ste?|ave|pres|lieut|rt|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|"
            r"adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc|sr)|M(?i:iss)")
_ABCOMP2 = r"(?i:invt|elec|natl|m[ft]g|dept|blvd|rd|ave)"
_ABBREV4 = rf"(?:{_ABTITLE}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph)|v|{_ACRO}|{_ABCOMP2})"
_ABBREV3 = r"(?:(?i:ca|figs?|prop|nos?|sect?s?|arts?|paras?|bldg|pp|op)|Pt|(?i:rs))\."
_THING = rf"(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+)*"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:(?:{_ACRO2})\.|[A-Za-z0-9\u00AD]+))+"
_QUOTES = r"(?:[`\u2018-\u201F\u0082\u0084\u0091-\u0094\u2039\u203A\u00AB\u00BB]{1,2}|''|['\u0092\u2019]|&apos;)"
_MISCSYMBOL = ("[\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7"
               "\u0387\u2016\u2017\u2020-\u2025\u2030-\u2038\u203B\u203C\u2043\u203E-\u2042\u2044"
               "\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u30FB"
               "\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")

_LATEX_LEFT_SINGLE = re.compile("[\u0082\u008B\u0091\u2018\u201A\u201B\u2039]")
_LATEX_RIGHT_SINGLE = re.compile("[\u0092\u009B\u2019\u203A]")
_LATEX_LEFT_DOUBLE = re.compile("[\u0084\u0093\u201C\u201E\u00AB]")
_LATEX_RIGHT_DOUBLE = re.compile("[\u0094\u201D\u00BB]")


def _quotes(tok: str, left: bool) -> str:
    """PTBLexer's latexQuotes normalisation (its default)."""
    if left:
        tok = re.sub(r"&apos;|'", "`", tok)
        tok = re.sub(r'"|&quot;', "``", tok)
    else:
        tok = re.sub(r"&apos;|'", "'", tok)
        tok = re.sub(r'"|&quot;', "''", tok)
    tok = _LATEX_LEFT_SINGLE.sub("`", tok)
    tok = _LATEX_RIGHT_SINGLE.sub("'", tok)
    tok = _LATEX_LEFT_DOUBLE.sub("``", tok)
    return _LATEX_RIGHT_DOUBLE.sub("''", tok)


def _same(t: str) -> str:
    return t


def _parens(t: str) -> str:
    return t.replace("(", "-LRB-").replace(")", "-RRB-")


_CURRENCY = {"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u00A4": "$", "\u20A0": "$", "\u20AC": "$"}
_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}

# (pattern, trailing context or None, action). An action maps the matched text to the token
# text; an int action k means "emit the text minus its last k characters and re-scan those".
_RULES_SPEC: list[tuple[str, str | None, object]] = [
    (r"(?i:c\+\+|[cf]#)", None, _same),
    (r"(?i:cannot|'twas)", None, 3),
    (rf"(?i:{_APOS}tis|gonna|gotta|lemme|gimme|wanna)", None, 2),
    ((r"<(?:[!?][A-Za-z-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.-]*[ ]*=[ ]*"
      r"(?:'[^'\r\n]*'|\"[^\"\r\n]*\"|[A-Za-z][A-Za-z0-9_:.-]*)|[A-Za-z][A-Za-z0-9_:.-]*))*[ ]*/?|"
      r"/[A-Za-z][A-Za-z0-9_:.-]*)[ ]*>"), None, lambda t: t.replace(" ", "\u00A0")),
    (r"(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", None, lambda t: "--"),
    (r"(?i:&amp;)", None, lambda t: "&"),
    (r"(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)", None, _same),
    (_WORD, _REDAUX, lambda t: t.replace("\u00AD", "")),
    (_SWORD, _SREDAUX, lambda t: t.replace("\u00AD", "")),
    (_WORD, None, lambda t: t.replace("\u00AD", "")),
    ((rf"{_APOS}(?i:n){_APOS}?|[lLdDjJ]{_APOS}|(?i:dunkin|somethin|ol){_APOS}|{_APOS}(?i:em)|"
      rf"[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*|{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?)|"
      rf"{_L}{_L}*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*|{_APOS}(?i:cause)|(?i:cont'd\.?|"
      r"nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|"
      rf"(?i:o){_APOSETC}(?i:o)"), None, _same),
    (rf"(?i:y){_APOS}", rf"{_L}", _same),
    (r"(?i:https?|ftp)://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]", None, _same),
    ((r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|"
      r"(?:[^ \t\n\f\r\"`'<>|.!?(){},\-_$]+\.)+(?i:com|net|org|edu))"
      r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"), None, _same),
    ((r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00A0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
      r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:(?i:&gt;)|>)?"), None, _same),
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_L}+", None, _same),
    (_REDAUX, r"[^A-Za-z]", lambda t: _quotes(t, False)),
    (_SREDAUX, r"[^A-Za-z]", lambda t: _quotes(t, False)),
    (rf"{_D}{{1,2}}[-/]{_D}{{1,2}}[-/]{_D}{{2,4}}", None, _same),
    (_NUMBER, None, lambda t: t.replace("\u00AD", "")),
    (r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)",
     None, _same),
    (rf"(?:{_D}{{1,4}}[- \u00A0])?{_D}{{1,4}}(?:\\?/|\u2044){_D}{{1,4}}", None,
     lambda t: t.replace(" ", "\u00A0")),
    ("[\u00BC\u00BD\u00BE\u2153-\u215E]", None, lambda t: _FRACTIONS.get(t, t)),
    ((r"-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)|"
      rf"(?i:cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est)"), None, lambda t: re.sub("(?i)&amp;", "&", t)),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, _same),
    (r"[A-Z]*\$|#", None, _same),
    ("[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]", None,
     lambda t: _CURRENCY.get(t, t)),
    (_ABBREV3, rf"{_SPACENL}?{_D}", _same),
    (_ABBREV1, r"[\s\S]{2}", _same),
    (_ABBREV1, None, _same),
    (rf"{_ABBREV4}\.", None, _same),
    (_ABBREV4, _SPACE, _same),
    (_ACRO, _SPACENL, _same),
    (rf"{_APOS}[0-9][0-9]", _SPACENL, _same),
    (rf"{_WORD}\.", r"[,;:]", lambda t: t.replace("\u00AD", "")),
    (r"(?:\([0-9]{3}\)[ \u00A0]?|[0-9]{3}[- \u00A0.])[0-9]{3}[- \u00A0.][0-9]{4}", None,
     lambda t: _parens(t.replace(" ", "\u00A0"))),
    (r'"|(?i:&quot;)', r"[A-Za-z0-9$]", lambda t: _quotes(t, True)),
    (r'"|(?i:&quot;)', None, lambda t: _quotes(t, False)),
    (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", r"[^A-Za-z0-9]", _parens),
    ((r"[-\^x=~<>']_[-\^x=~<>']|\([-\^x=~<>'][_.]?[-\^x=~<>']\)|"
      r"\([\^x=~<>']-[\^x=~<>'`]\)"), None, _parens),
    (r"\+|[%&\u2030\u2031]|~|\^|\||\\", None, _same),
    (r"\{", None, lambda t: "-LCB-"),
    (r"\}", None, lambda t: "-RCB-"),
    (r"\[", None, lambda t: "-LSB-"),
    (r"\]", None, lambda t: "-RSB-"),
    (r"\(", None, lambda t: "-LRB-"),
    (r"\)", None, lambda t: "-RRB-"),
    (r"<<|>>|<|>", None, _same),
    (r"-+", None, lambda t: "--" if 3 <= len(t) <= 4 else t),
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", None, lambda t: "..."),
    (r"@+|#+|_+", None, _same),
    (r"\*+|(?:\\\*){1,3}", None, _same),
    (r"[,;:]", None, _same),
    (r"[?!]+", None, _same),
    ("[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA]", None, _same),
    (r"=", None, _same),
    (r"/", None, _same),
    (rf"{_HTHING}\.", r"[,;:]", lambda t: t.replace("\u00AD", "")),
    (_HTHING, None, lambda t: t.replace("\u00AD", "")),
    (rf"{_THING}\.", r"[,;:]", _same),
    (_THING, None, _same),
    (r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+\.", r"[,;:]", lambda t: re.sub("(?i)&amp;", "&", t)),
    (r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+", None, lambda t: re.sub("(?i)&amp;", "&", t)),
    (r"'", r"[A-Za-z][^ \t\n\r\u00A0]", lambda t: _quotes(t, True)),
    (_REDAUX, None, lambda t: _quotes(t, False)),
    (_SREDAUX, None, lambda t: _quotes(t, False)),
    (_QUOTES, None, lambda t: _quotes(t, False)),
    (_MISCSYMBOL, None, _same),
]


def _split_alternatives(pattern: str) -> list[str]:
    """Split a pattern at its top-level ``|``: Python takes the first alternative that matches,
    JFlex the longest, so each alternative is matched on its own and the longest kept."""
    parts, depth, cls, esc, start = [], 0, False, False, 0
    for i, ch in enumerate(pattern):
        if esc:
            esc = False
        elif ch == "\\":
            esc = True
        elif cls:
            cls = ch != "]" or i == start
        elif ch == "[":
            cls = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    parts.append(pattern[start:])
    return parts


_SPACES = re.compile(r"[ \t\u00A0\u2000-\u200A\u3000\x00\u200B\u200E\u200F\uFEFF]+")
# Fast path: a run of ASCII letters followed by a space or line end is a token of its own under
# every rule, except for the words that the assimilation rules split ("cannot" -> "can not").
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=[ \n])")
_SPLIT_WORDS = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})
_RULES = [
    ([re.compile(f"(?:{p})(?={la})" if la else p) for p in _split_alternatives(pat)],
     re.compile(la) if la else None, act)
    for pat, la, act in _RULES_SPEC
]


def _lex_lines(lines: Sequence[str]) -> list[list[str]]:
    """Raw PTB tokens (before lower-casing and punctuation removal) of each line.

    Like the jar, the lines are scanned as one stream: a few trailing-context rules look past
    the end of a line (e.g. "no." keeps its period when the next line starts with a digit).
    """
    text = "\n".join(lines) + "\n"
    out: list[list[str]] = [[] for _ in lines]
    line, tokens = 0, out[0] if lines else []
    pos, n = 0, len(text)
    while pos < n:
        ch = text[pos]
        if ch == "\n":
            line += 1
            if line < len(out):
                tokens = out[line]
            pos += 1
            continue
        skip = _SPACES.match(text, pos)
        if skip:
            pos = skip.end()
            continue
        plain = _PLAIN_WORD.match(text, pos)
        if plain and plain.group().lower() not in _SPLIT_WORDS:
            tokens.append(plain.group())
            pos = plain.end()
            continue
        best_len, best_end, best_act = 0, pos, None
        for alternatives, la, act in _RULES:
            for rx in alternatives:
                m = rx.match(text, pos)
                if m is None or m.end() == pos:
                    continue
                total = m.end() - pos
                if la is not None:
                    total += la.match(text, m.end()).end() - m.end()
                if total > best_len:
                    best_len, best_end, best_act = total, m.end(), act
        if best_act is None:  # untokenizable character: the jar deletes it
            pos += 1
            continue
        matched = text[pos:best_end]
        if isinstance(best_act, int):
            tokens.append(matched[:-best_act])
            pos = best_end - best_act
        else:
            tokens.append(best_act(matched))
            pos = best_end
    return out


def ptb_tokens_python(text: str) -> list[str]:
    """Raw PTB tokens of one caption (before lower-casing and punctuation removal)."""
    return _lex_lines([_clean(text)])[0]


def ptb_tokenize_python(streams: Sequence[Sequence[str]]) -> list[list[str]]:
    """Pure-Python stand-in for :func:`ptb_tokenize_java`: same arguments, same results for
    ordinary English captions (see the module docstring)."""
    result = []
    for stream in streams:
        out = []
        for toks in _lex_lines([_clean(t) for t in stream]):
            low = (t.lower() for t in toks)
            out.append(" ".join(t for t in low if t not in _PUNCT_SET))
        result.append(out)
    return result
