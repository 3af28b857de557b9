"""Stages of the harmful-request-refusal (HRR) objective: instruction world, refusal training, evaluation."""
