"""Integrations with the frameworks people train with: PyTorch Lightning
(:mod:`sharpfused.integrations.lightning`), Hugging Face Trainer
(:mod:`sharpfused.integrations.huggingface`) and accelerate (:mod:`sharpfused.integrations.accelerate`).

Each module imports its framework only when imported itself; ``import sharpfused`` never needs one.
"""
