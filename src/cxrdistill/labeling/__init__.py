"""Rule-based labels mined from free-text radiology reports (negation and uncertainty aware)."""

from cxrdistill.labeling.labeler import STATUSES, Mention, find_mentions, label_manifest, label_report, split_sentences
from cxrdistill.labeling.vocab import DEFAULT_VOCAB, Vocabulary, load_vocab, vocab_from_dict

__all__ = ["DEFAULT_VOCAB", "STATUSES", "Mention", "Vocabulary", "find_mentions", "label_manifest",
           "label_report", "load_vocab", "split_sentences", "vocab_from_dict"]
