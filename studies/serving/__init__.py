"""What ChunkKV buys inside transformers' continuous batching (``chunkkv serve``): see README.md."""
