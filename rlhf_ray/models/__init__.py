"""HF model loading for training and inference (loading.py), LoRA (lora.py), value/reward heads (value_head.py),
and the tiny test models (tiny.py). Nothing here imports torch.distributed: engines apply parallelism."""
