"""Data: the generated scenes, Hugging Face datasets and partitions of the clients, and the pretraining corpus."""
