"""Routes of our own on a served port (next to the OpenAI API the backend answers)."""
INFO_PATH = "/loradeploy/info"    # proxy, from its control file: what the port serves (version, sha256, gguf)
PROXY_PATH = "/loradeploy/proxy"  # proxy: current backend port and requests in flight per backend
