"""The vocabulary of the rule-based report labeler: what names each class, what negates or hedges.

A vocabulary is a YAML file (or dict) like

```yaml
extends: default            # optional: start from the built-in vocabulary and override/add
classes:
  Pleural Effusion:
    names: [pleural effusion, effusion]     # manifest class names this entry serves
    mentions: [pleural effusion, effusion, pleural fluid]   # literal phrases (plural-tolerant)
    patterns: []                            # extra regular expressions of a mention
    negative_patterns: []                   # regexes that state the finding is absent
    exclude: [pericardial effusion]         # regexes: a mention inside a match is ignored
negation: {pre: [no, without, ...], post: [is not seen, ...]}
uncertainty: {pre: [possible, may represent, ...], post: [cannot be excluded, ...]}
pseudo: [no change, ...]   # look like cues but are not (masked before cue search)
scope_end: [but, however, ...]   # end a cue's scope (so do sentence ends)
scope_end_pre: [is, are, ...]    # also end a *pre*-cue's scope ("no X is seen, the heart is enlarged")
```

Class names are matched to a manifest's classes case- and punctuation-insensitively
(`"Pleural_Thickening"` == `"pleural thickening"`). Cue lists are literal phrases.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from cxrdistill.errors import ConfigError


def normalize_name(name: str) -> str:
    """Case- and punctuation-insensitive key of a class name."""
    return re.sub(r"[^a-z0-9]+", "", name.lower())


def phrase_regex(phrase: str, plural: bool = True) -> str:
    """Regex of a literal phrase: words separated by any whitespace, whole words, optional plural."""
    words = [re.escape(w) for w in phrase.lower().split()]
    if not words:
        raise ConfigError("empty phrase in vocabulary")
    body = r"\s+".join(words)
    if plural and re.fullmatch(r"[a-z]+", words[-1]):
        body += r"(?:s|es)?"
    return rf"(?<![\w-]){body}(?![\w-])"


def _alternation(phrases: list[str], plural: bool) -> re.Pattern[str] | None:
    if not phrases:
        return None
    ordered = sorted(set(phrases), key=len, reverse=True)
    return re.compile("|".join(f"(?:{phrase_regex(p, plural)})" for p in ordered))


@dataclass(frozen=True)
class ClassVocab:
    """How one class is mentioned in a report."""

    name: str
    names: tuple[str, ...] = ()
    mentions: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    negative_patterns: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @cached_property
    def mention_re(self) -> re.Pattern[str]:
        parts = [phrase_regex(m) for m in sorted(self.mentions, key=len, reverse=True)] + list(self.patterns)
        if not parts:
            raise ConfigError(f"vocabulary class {self.name!r} has no mentions or patterns")
        return re.compile("|".join(f"(?:{p})" for p in parts))

    @cached_property
    def negative_re(self) -> re.Pattern[str] | None:
        return re.compile("|".join(f"(?:{p})" for p in self.negative_patterns)) if self.negative_patterns else None

    @cached_property
    def exclude_re(self) -> re.Pattern[str] | None:
        return re.compile("|".join(f"(?:{p})" for p in self.exclude)) if self.exclude else None


@dataclass(frozen=True)
class Vocabulary:
    """Classes plus the negation / uncertainty cue lists of the labeler."""

    classes: tuple[ClassVocab, ...]
    negation_pre: tuple[str, ...] = ()
    negation_post: tuple[str, ...] = ()
    uncertainty_pre: tuple[str, ...] = ()
    uncertainty_post: tuple[str, ...] = ()
    pseudo: tuple[str, ...] = ()
    scope_end: tuple[str, ...] = ()
    scope_end_pre: tuple[str, ...] = ()
    post_max_words: int = 4
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def entry_for(self, class_name: str) -> ClassVocab | None:
        """The entry serving a manifest class name (by its name or one of its `names`), or None."""
        key = normalize_name(class_name)
        for c in self.classes:
            if key == normalize_name(c.name) or key in {normalize_name(n) for n in c.names}:
                return c
        return None

    @cached_property
    def cues(self) -> dict[str, re.Pattern[str] | None]:
        return {"neg_pre": _alternation(list(self.negation_pre), False),
                "neg_post": _alternation(list(self.negation_post), False),
                "unc_pre": _alternation(list(self.uncertainty_pre), False),
                "unc_post": _alternation(list(self.uncertainty_post), False),
                "pseudo": _alternation(list(self.pseudo), False),
                "end": _alternation(list(self.scope_end), False),
                "end_pre": _alternation(list(self.scope_end_pre), False)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": {c.name: {k: list(getattr(c, k)) for k in
                                 ("names", "mentions", "patterns", "negative_patterns", "exclude")
                                 if getattr(c, k)} for c in self.classes},
            "negation": {"pre": list(self.negation_pre), "post": list(self.negation_post)},
            "uncertainty": {"pre": list(self.uncertainty_pre), "post": list(self.uncertainty_post)},
            "pseudo": list(self.pseudo), "scope_end": list(self.scope_end),
            "scope_end_pre": list(self.scope_end_pre), "post_max_words": self.post_max_words,
        }


_CLASS_KEYS = {"names", "mentions", "patterns", "negative_patterns", "exclude"}
_TOP_KEYS = {"extends", "classes", "negation", "uncertainty", "pseudo", "scope_end", "scope_end_pre",
             "post_max_words"}


def vocab_from_dict(raw: Mapping[str, Any], source: str = "vocabulary") -> Vocabulary:
    """Build (and check) a vocabulary from its dict form; `extends: default` merges over the default."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a vocabulary must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    base: dict[str, Any] = {}
    if raw.get("extends") not in (None, "default"):
        raise ConfigError(f"{source}: 'extends' can only be 'default', got {raw['extends']!r}")
    if raw.get("extends") == "default":
        base = DEFAULT_VOCAB_DICT
    merged_classes = dict(base.get("classes", {}))
    merged_classes.update(raw.get("classes") or {})
    classes = []
    for name, spec in merged_classes.items():
        spec = spec or {}
        if not isinstance(spec, Mapping) or set(spec) - _CLASS_KEYS:
            raise ConfigError(f"{source}: class {name!r} must map keys among {sorted(_CLASS_KEYS)}, got {spec!r}")
        fields = {k: tuple(str(v) for v in spec.get(k, ()) or ()) for k in _CLASS_KEYS}
        for k in ("patterns", "negative_patterns", "exclude"):
            for pattern in fields[k]:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{source}: class {name!r}: bad regex in {k}: {pattern!r} ({exc})") from None
        entry = ClassVocab(str(name), **fields)
        if not entry.mentions and not entry.patterns:
            raise ConfigError(f"{source}: class {name!r} has no mentions or patterns")
        classes.append(entry)

    def pick(key: str, sub: str | None = None) -> tuple[str, ...]:
        value = raw.get(key, base.get(key)) if sub is None else (raw.get(key) or base.get(key) or {}).get(sub, ())
        return tuple(str(v) for v in value or ())

    return Vocabulary(tuple(classes), pick("negation", "pre"), pick("negation", "post"),
                      pick("uncertainty", "pre"), pick("uncertainty", "post"), pick("pseudo"),
                      pick("scope_end"), pick("scope_end_pre"),
                      int(raw.get("post_max_words", base.get("post_max_words", 4))))


def load_vocab(path: str | Path | None = None) -> Vocabulary:
    """The vocabulary in a YAML file, or the built-in default when `path` is None."""
    if path is None:
        return DEFAULT_VOCAB
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"vocabulary file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return vocab_from_dict(raw or {}, source=str(path))


# ---------------------------------------------------------------------------------------------
# the built-in vocabulary: the synthetic world's classes and common chest X-ray findings, with
# the class names of CheXpert / MIMIC-CXR, ChestX-ray14, VinDr-CXR and MS-CXR as aliases.

_LUNGS_CLEAR = r"lungs?\s+(?:are|is|remain|appear)?\s*(?:otherwise\s+)?clear"

DEFAULT_VOCAB_DICT: dict[str, Any] = {
    "classes": {
        "Cardiomegaly": {
            "names": ["cardiomegaly"],
            "mentions": ["cardiomegaly", "cardiac enlargement", "enlarged heart", "enlarged cardiac silhouette",
                         "enlargement of the cardiac silhouette", "enlarged cardiac contour"],
            "patterns": [r"(?:heart|cardiac silhouette|cardiac contour|heart size)\s+(?:is\s+|are\s+|appears\s+|remains\s+)?"
                         r"(?:\w+ly\s+)?(?:enlarged|increased|large)"],
            "negative_patterns": [r"(?:normal|unremarkable)\s+(?:heart|cardiac)\s+(?:size|silhouette)",
                                  r"(?:heart|cardiac)\s+(?:size|silhouette|contour)s?\s+(?:\w+\s+){0,4}(?:normal|"
                                  r"within\s+normal|upper\s+limits?\s+of\s+normal|unremarkable)",
                                  r"heart\s+(?:is\s+)?(?:not\s+enlarged|normal\s+in\s+size)",
                                  r"cardiomediastinal\s+(?:silhouette|contours?)\s+(?:\w+\s+){0,3}(?:normal|within\s+normal|unremarkable)",
                                  r"normal\s+cardiomediastinal"],
        },
        "Pleural Effusion": {
            "names": ["pleural effusion", "effusion"],
            "mentions": ["pleural effusion", "effusion", "pleural fluid", "hydrothorax", "hydropneumothorax"],
            "exclude": [r"pericardial\s+effusion"],
        },
        "Pneumothorax": {
            "names": ["pneumothorax"],
            "mentions": ["pneumothorax", "pneumothoraces", "hydropneumothorax"],
        },
        "Nodule": {
            "names": ["nodule", "nodule/mass"],
            "mentions": ["nodule", "nodular opacity", "nodular density", "nodular opacities"],
        },
        "Mass": {
            "names": ["mass"],
            "mentions": ["mass", "masses"],
            "exclude": [r"mass\s+effect", r"soft\s+tissue\s+mass"],
        },
        "Lung Lesion": {
            "names": ["lung lesion"],
            "mentions": ["nodule", "mass", "lesion", "neoplasm", "tumor", "carcinoma"],
            "exclude": [r"mass\s+effect", r"soft\s+tissue\s+mass", r"(?:bone|bony|lytic|sclerotic)\s+lesion"],
        },
        "Consolidation": {
            "names": ["consolidation"],
            "mentions": ["consolidation", "consolidative opacity", "consolidations", "consolidative"],
            "negative_patterns": [_LUNGS_CLEAR],
        },
        "Pneumonia": {
            "names": ["pneumonia"],
            "mentions": ["pneumonia", "bronchopneumonia", "pneumonitis", "infectious process", "infection"],
            "exclude": [r"granulomatous\s+(?:infection|disease|process)"],
        },
        "Atelectasis": {
            "names": ["atelectasis"],
            "mentions": ["atelectasis", "atelectases", "atelectatic", "collapse", "subsegmental atelectasis"],
        },
        "Edema": {
            "names": ["edema", "pulmonary edema"],
            "mentions": ["edema", "oedema", "pulmonary edema", "interstitial edema"],
            "exclude": [r"soft\s+tissue\s+edema"],
        },
        "Lung Opacity": {
            "names": ["lung opacity", "opacity"],
            "mentions": ["opacity", "opacities", "opacification", "density", "densities", "infiltrate",
                         "infiltrates", "airspace disease", "air space disease", "haziness"],
            "exclude": [r"bone\s+density"],
            "negative_patterns": [_LUNGS_CLEAR],
        },
        "Infiltration": {
            "names": ["infiltration", "infiltrate"],
            "mentions": ["infiltrate", "infiltrates", "infiltration"],
        },
        "Fracture": {
            "names": ["fracture", "rib fracture"],
            "mentions": ["fracture", "fractures", "fractured"],
        },
        "Emphysema": {
            "names": ["emphysema"],
            "mentions": ["emphysema", "emphysematous"],
        },
        "Fibrosis": {
            "names": ["fibrosis", "pulmonary fibrosis"],
            "mentions": ["fibrosis", "fibrotic"],
        },
        "Pleural Thickening": {
            "names": ["pleural thickening", "pleural_thickening"],
            "mentions": ["pleural thickening", "thickened pleura", "pleural plaque"],
        },
        "Pleural Other": {
            "names": ["pleural other"],
            "mentions": ["pleural thickening", "pleural plaque", "fibrothorax", "pleural scarring"],
        },
        "Enlarged Cardiomediastinum": {
            "names": ["enlarged cardiomediastinum", "aortic enlargement"],
            "mentions": ["widened mediastinum", "mediastinal widening", "widening of the mediastinum",
                         "enlarged cardiomediastinal silhouette", "mediastinal enlargement"],
        },
        "Hernia": {
            "names": ["hernia"],
            "mentions": ["hiatal hernia", "hiatus hernia", "hernia"],
        },
        "Granuloma": {
            "names": ["granuloma"],
            "mentions": ["granuloma", "granulomas", "granulomatous"],
        },
        "Support Devices": {
            "names": ["support devices"],
            "mentions": ["pacemaker", "pacer", "catheter", "endotracheal tube", "nasogastric tube",
                         "enteric tube", "feeding tube", "chest tube", "picc", "central line",
                         "central venous line", "port-a-cath", "defibrillator", "stent", "tracheostomy"],
        },
    },
    "negation": {
        "pre": ["no", "not", "without", "negative for", "free of", "clear of", "no evidence of",
                "no signs of", "absence of", "resolution of", "resolved", "rather than", "never",
                "no longer", "nor", "ruled out", "removal of", "interval removal of", "does not appear",
                "do not appear", "does not demonstrate", "not definitely seen"],
        "post": ["is not seen", "are not seen", "not seen", "not identified", "not demonstrated",
                 "not present", "not visualized", "not evident", "not appreciated", "is absent",
                 "are absent", "absent", "has resolved", "have resolved", "resolved", "has cleared",
                 "no longer seen", "no longer present", "has been removed", "were removed",
                 "is not enlarged", "not enlarged", "is ruled out"],
    },
    "uncertainty": {
        "pre": ["possible", "possibly", "probable", "probably", "likely", "may represent", "may be",
                "may reflect", "might", "could represent", "could be", "could reflect", "suggest",
                "suggests", "suggestive of", "suggesting", "concerning for", "concern for",
                "suspicious for", "suspected", "suspicion of", "questionable", "question of",
                "cannot exclude", "can not exclude", "cannot rule out", "can not rule out",
                "not possible to exclude", "difficult to exclude", "differential diagnosis includes",
                "versus", "vs", "equivocal", "presumed", "rule out", "worrisome for", "question",
                "may indicate", "to exclude", "evaluate for", "evaluation for", "could obscure",
                "differential diagnosis including", "differential includes"],
        "post": ["cannot be excluded", "can not be excluded", "not excluded", "is not excluded",
                 "cannot be ruled out", "can not be ruled out", "not ruled out", "is possible",
                 "is suspected", "is questioned", "versus", "vs", "is not entirely excluded",
                 "is likely", "are likely"],
    },
    "pseudo": ["no change", "no interval change", "no significant change", "no significant interval change",
               "without change", "not changed", "not significantly changed", "no increase",
               "no decrease", "not only", "no worsening"],
    "scope_end": ["but", "however", "although", "though", "except", "whereas", "while", "yet",
                  "aside from", "other than", "apart from", "with the exception of", "which", "there is",
                  "there are", "there has been", "there may be", "there could be"],
    "scope_end_pre": ["is", "are", "was", "were", "has", "have", "had", "appears", "appear", "remains",
                      "remain", "shows", "show", "demonstrates", "demonstrate", "seen", "noted",
                      "identified"],
    "post_max_words": 4,
}

DEFAULT_VOCAB: Vocabulary = vocab_from_dict(DEFAULT_VOCAB_DICT, source="default vocabulary")
