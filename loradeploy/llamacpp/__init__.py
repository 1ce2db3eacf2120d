"""llama.cpp on this machine: the CPU mode decision (runtime), the probe child, in-process loads."""
