"""Evaluation: FID, CIDEr-D, judge accuracy, recall@k, a style classifier, and the knowledge benchmark."""

from racm3.evaluation.cider import cider, cider_scores
from racm3.evaluation.fid import feature_stats, fid, fid_from_features, frechet_distance, inception_features
from racm3.evaluation.judge import JudgeResult, concept_words, image_judge, name_accuracy, name_match
from racm3.evaluation.recall import recall_at_k
from racm3.evaluation.text import normalize, words

__all__ = ["cider", "cider_scores", "feature_stats", "fid", "fid_from_features", "frechet_distance",
           "inception_features", "JudgeResult", "concept_words", "image_judge", "name_accuracy", "name_match",
           "recall_at_k", "normalize", "words"]
