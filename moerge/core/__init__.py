"""What every layer builds on: safetensors-only file I/O with atomic writes, and base-model fingerprints."""
