"""The gpuq worker: the agent on a GPU machine that claims jobs, runs a backend and stores outputs."""
