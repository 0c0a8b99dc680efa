"""Adapters: LoRA (lora.py: the layers, merging, saving) and PEFT's folder format (peft.py).

They sit below the checkpoint code, which writes and reads them, and below training and inference,
which apply them."""
