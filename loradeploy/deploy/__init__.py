"""Deploy: versions on disk, targets (llama.cpp server, LM Studio, Ollama) and rollback, on top of serving/."""
