"""sam3lora: fine-tune SAM 3 with LoRA adapters."""
