"""The model: Hugging Face encoders and their LoRA wiring, the multi-modal model, mixture-of-experts LoRA and its routing, and pretraining of foundation bases."""
