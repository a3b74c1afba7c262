"""Package data: the model card template (see hf_astroquant.export.card)."""
