"""Rule-based report labeler in the spirit of NegBio / the CheXpert labeler.

For each sentence of a report: find the mentions of every class (its phrases and patterns,
minus excluded contexts), then decide each mention's status from the cues around it:

- *uncertain* when an uncertainty cue precedes it ("possible", "may represent", "cannot
  exclude") or follows it closely ("... cannot be excluded"), except that a negation before the
  uncertainty cue wins ("no opacity to suggest pneumonia" is negative);
- *negative* when a negation cue precedes it ("no", "without", "negative for", "free of") or
  follows it closely ("... is not seen", "... has resolved");
- *positive* otherwise.
A pre-cue's scope ends at the sentence end, at a scope terminator ("but", "however", "there is")
or at a verb ("no acute disease is seen, the heart is enlarged"); a post-cue must follow within
`post_max_words` words. Pseudo-cues ("no change") are masked first. A class's
`negative_patterns` ("normal heart size") give negative mentions directly.

A class's report status aggregates its mentions: positive > uncertain > negative > absent.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from cxrdistill.errors import ConfigError
from cxrdistill.labeling.vocab import DEFAULT_VOCAB, Vocabulary

Status = Literal["positive", "uncertain", "negative", "absent"]
STATUSES: tuple[str, ...] = ("positive", "uncertain", "negative", "absent")
_RANK = {s: len(STATUSES) - i for i, s in enumerate(STATUSES)}
_SENTENCE_END = re.compile(r"[.!?;]+(?!\d)|\n\s*\n")
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Mention:
    """One class mention: its text, status and the cue that decided it (None for positive)."""

    label: str
    text: str
    status: str
    cue: str | None
    sentence: str


@dataclass(frozen=True)
class _Cue:
    kind: str  # neg_pre | neg_post | unc_pre | unc_post
    start: int
    end: int
    text: str


def split_sentences(text: str) -> list[str]:
    """Lower-cased sentences (split at . ! ? ; not followed by a digit, and at blank lines)."""
    return [s.strip() for s in _SENTENCE_END.split(text.lower()) if s and s.strip()]


def find_mentions(text: str, vocab: Vocabulary = DEFAULT_VOCAB) -> list[Mention]:
    """Every class mention of `text` with its status (see the module docstring)."""
    out: list[Mention] = []
    for sentence in split_sentences(text):
        masked = _mask(sentence, vocab.cues["pseudo"])
        cues = _find_cues(masked, vocab)
        for entry in vocab.classes:
            excluded = [m.span() for m in entry.exclude_re.finditer(sentence)] if entry.exclude_re else []
            for m in entry.mention_re.finditer(sentence):
                if any(a <= m.start() and m.end() <= b for a, b in excluded):
                    continue
                if any(c.start <= m.start() and m.end() <= c.end for c in cues):
                    continue  # the phrase is part of a cue
                status, cue = _status(masked, m.start(), m.end(), cues, vocab)
                out.append(Mention(entry.name, m.group(0), status, cue, sentence))
            if entry.negative_re is not None:
                for m in entry.negative_re.finditer(sentence):
                    out.append(Mention(entry.name, m.group(0), "negative", m.group(0), sentence))
    return out


def label_report(text: str | None, vocab: Vocabulary = DEFAULT_VOCAB) -> dict[str, str]:
    """`{class: "positive" | "negative" | "uncertain" | "absent"}` for every vocabulary class."""
    result = {name: "absent" for name in vocab.class_names}
    if not text:
        return result
    for mention in find_mentions(text, vocab):
        if _RANK[mention.status] > _RANK[result[mention.label]]:
            result[mention.label] = mention.status
    return result


# ---------------------------------------------------------------------------------------------


def _mask(sentence: str, pattern: re.Pattern[str] | None) -> str:
    """`sentence` with the matches of `pattern` blanked out (offsets kept)."""
    if pattern is None:
        return sentence
    return pattern.sub(lambda m: " " * len(m.group(0)), sentence)


def _find_cues(masked: str, vocab: Vocabulary) -> list[_Cue]:
    cues = [_Cue(kind, m.start(), m.end(), m.group(0))
            for kind in ("unc_pre", "unc_post", "neg_pre", "neg_post")
            if (pattern := vocab.cues[kind]) is not None for m in pattern.finditer(masked)]
    unc = [c for c in cues if c.kind.startswith("unc")]
    # a negation word inside an uncertainty phrase ("not excluded", "cannot rule out") is not a negation
    return [c for c in cues if c.kind.startswith("unc")
            or not any(u.start <= c.start and c.end <= u.end for u in unc)]


def _in_pre_scope(masked: str, cue: _Cue, start: int, vocab: Vocabulary) -> bool:
    if cue.end > start:
        return False
    gap = masked[cue.end:start]
    return not any(p is not None and p.search(gap) for p in (vocab.cues["end"], vocab.cues["end_pre"]))


def _in_post_scope(masked: str, cue: _Cue, end: int, vocab: Vocabulary) -> bool:
    if cue.start < end:
        return False
    gap = masked[end:cue.start]
    if len(_WORD.findall(gap)) > vocab.post_max_words or "," in gap:
        return False
    return vocab.cues["end"] is None or not vocab.cues["end"].search(gap)


def _status(masked: str, start: int, end: int, cues: list[_Cue], vocab: Vocabulary) -> tuple[str, str | None]:
    pre = [c for c in cues if c.kind.endswith("pre") and _in_pre_scope(masked, c, start, vocab)]
    post = [c for c in cues if c.kind.endswith("post") and _in_post_scope(masked, c, end, vocab)]
    unc = [c for c in pre + post if c.kind.startswith("unc")]
    neg = [c for c in pre + post if c.kind.startswith("neg")]
    if unc:
        first_unc = min((c.start for c in unc if c.kind == "unc_pre"), default=None)
        dominant = [c for c in neg if c.kind == "neg_pre" and first_unc is not None and c.end <= first_unc]
        if dominant:
            return "negative", dominant[0].text
        return "uncertain", unc[0].text
    if neg:
        return "negative", neg[0].text
    return "positive", None


# ---------------------------------------------------------------------------------------------
# applying the labeler to a manifest


@dataclass(frozen=True)
class LabelingResult:
    """What `label_manifest` did: counts per class and status, images labeled/upgraded/skipped."""

    labeled: int
    upgraded: int
    without_report: int
    counts: dict[str, Counter]


def class_mapping(class_names: Iterable[str], vocab: Vocabulary) -> dict[str, str]:
    """`{manifest class: vocabulary class}`; ConfigError naming every class with no entry."""
    mapping, missing = {}, []
    for name in class_names:
        entry = vocab.entry_for(name)
        if entry is None:
            missing.append(name)
        else:
            mapping[name] = entry.name
    if missing:
        raise ConfigError(f"no vocabulary entry for manifest class(es) {missing}; add them under "
                          f"'classes' (with 'names: [...]') in a vocabulary YAML (extends: default). "
                          f"Known: {vocab.class_names}")
    return mapping


def label_manifest(manifest, vocab: Vocabulary = DEFAULT_VOCAB, *, uncertain: str = "ignore",
                   supervision: Iterable[str] = ("none",), upgrade: bool = False):
    """Mine image-level labels from the reports of images whose supervision is in `supervision`.

    Per image with a report: `labels` become the classes reported positive (plus uncertain ones
    when `uncertain="positive"`; `"ignore"` lists them in the extra key `uncertain_labels`,
    `"negative"` drops them), the full per-class status goes to the extra key `report_labels`,
    and box classes are always kept in `labels`. With `upgrade`, `"none"` images become
    `"image"`. Returns `(new manifest, LabelingResult)`.
    """
    if uncertain not in ("positive", "negative", "ignore"):
        raise ValueError(f"uncertain must be 'positive', 'negative' or 'ignore', not {uncertain!r}")
    mapping = class_mapping(manifest.class_names, vocab)
    kinds = set(supervision)
    counts = {name: Counter() for name in manifest.class_names}
    images, labeled, upgraded, no_report = [], 0, 0, 0
    for im in manifest.images:
        if im.supervision not in kinds:
            images.append(im)
            continue
        if not im.report:
            no_report += 1
            images.append(im)
            continue
        status = label_report(im.report, vocab)
        per_class = {name: status[mapping[name]] for name in manifest.class_names}
        for name, s in per_class.items():
            counts[name][s] += 1
        boxed = {manifest.categories[manifest.class_index(a.category_id)].name
                 for a in manifest.annotations_of(im.id)}
        labels = [n for n, s in per_class.items()
                  if s == "positive" or (s == "uncertain" and uncertain == "positive") or n in boxed]
        extra = dict(im.extra, report_labels=per_class)
        unsure = [n for n, s in per_class.items() if s == "uncertain" and n not in labels]
        extra.pop("uncertain_labels", None)
        if uncertain == "ignore" and unsure:
            extra["uncertain_labels"] = unsure
        kind = "image" if upgrade and im.supervision == "none" else im.supervision
        upgraded += kind != im.supervision
        labeled += 1
        images.append(replace(im, labels=tuple(labels), supervision=kind, extra=extra))
    return manifest.replace_images(images), LabelingResult(labeled, upgraded, no_report, counts)
