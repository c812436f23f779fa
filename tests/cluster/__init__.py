"""Multi-node jobs: launcher environments, process-group set-up, launch scripts, node-local checkpoints."""
