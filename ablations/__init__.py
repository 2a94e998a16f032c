"""Ablation language-model runs: how solver quality moves perplexity (DESIGN.md section 8)."""
