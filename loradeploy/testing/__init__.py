"""Real components on loopback for tests and benchmarks (sshd, the vast.ai API stand-in)."""
