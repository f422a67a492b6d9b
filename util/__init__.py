"""The plumbing the stage scripts share: command lines, files, logs, processes, data indexes, checkpoints."""
