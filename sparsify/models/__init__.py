"""Small models trained from scratch, and SAEs on their activations: mlp.py (the digits MLP), mlp_saes.py;
lm.py (a small Llama/GPT-2 causal LM, saved as a Hugging Face folder that an SAE config can name)."""
