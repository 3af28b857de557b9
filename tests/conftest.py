"""Shared pytest setup: keep Hugging Face libraries offline so no test reaches the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
