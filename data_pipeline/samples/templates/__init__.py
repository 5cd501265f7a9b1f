"""Prompt templates of the training-sample stage, one JSON file per task (package data read by prompt_templates)."""
